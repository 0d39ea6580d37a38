"""Choose each tensor's format: the least loss within a byte budget, or the fewest bytes within a loss budget.

A multiple-choice knapsack: every tensor takes exactly one of its options (format, bytes, predicted loss,
decode cost). It is solved by Lagrangian relaxation, each tensor independently minimising
``loss + price * bytes + speed_price * cost``, with the prices found by bisection so that the budgets hold;
what a price leaves unspent is then given greedily to the upgrades with the most loss saved per byte. The
decode cost is a budget too: the ``min_decode_ratio`` of the build, as bytes the kernels read per step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from edgekit.errors import RecipeBudgetError
from edgekit.quant.formats import TensorFormat

_BISECTIONS = 60

BUDGET_FIX = (
    "raise --max-model-bytes (or max_model_bytes in the target), or build for a target without a recipe "
    "(laptop-cpu-rtn)"
)
"""What to do when no recipe fits the byte budget: predicted here, or measured once built (``recipe_build``)."""


@dataclass(frozen=True)
class Option:
    """One way to store one tensor: its format, file bytes, predicted loss and decode cost."""

    fmt: TensorFormat
    bytes: int
    loss: float
    cost: float


@dataclass(frozen=True)
class Objective:
    """What the search optimises: ``max_bytes`` set -> least loss in that many bytes; else fewest bytes
    with a predicted loss of at most ``max_loss``. ``max_cost`` bounds the decode cost either way."""

    max_bytes: int | None = None
    max_loss: float | None = None
    max_cost: float | None = None
    fixed_bytes: int = 0
    """Bytes of the model files that no choice changes (graph, norms, rotary tables): counted in ``max_bytes``."""

    def __post_init__(self) -> None:
        if (self.max_bytes is None) == (self.max_loss is None):
            raise ValueError("give exactly one of max_bytes and max_loss")


@dataclass(frozen=True)
class Recipe:
    """The chosen option per tensor, with its totals."""

    choices: dict[str, Option]

    @property
    def bytes(self) -> int:
        """File bytes of the quantized tensors."""
        return sum(o.bytes for o in self.choices.values())

    @property
    def loss(self) -> float:
        """Predicted loss: the sum of the tensors' predicted losses."""
        return sum(o.loss for o in self.choices.values())

    @property
    def cost(self) -> float:
        """Decode cost: bytes read per step, as the cost model counts them."""
        return sum(o.cost for o in self.choices.values())

    def formats(self) -> dict[str, TensorFormat]:
        """Tensor name -> format."""
        return {name: option.fmt for name, option in self.choices.items()}


class _Table:
    """Options as arrays [tensors, options], missing options priced out of reach."""

    def __init__(self, options: dict[str, list[Option]]) -> None:
        self.names = list(options)
        width = max(len(o) for o in options.values())
        self.options = [list(o) for o in options.values()]
        self.loss = np.full((len(self.names), width), np.inf)
        self.bytes = np.full((len(self.names), width), np.inf)
        self.cost = np.full((len(self.names), width), np.inf)
        for row, opts in enumerate(self.options):
            for col, option in enumerate(opts):
                self.loss[row, col], self.bytes[row, col], self.cost[row, col] = option.loss, option.bytes, option.cost

    def pick(self, price: float, speed_price: float) -> np.ndarray:
        missing = np.isinf(self.loss)
        finite = [np.where(missing, 0.0, a) for a in (self.loss, self.bytes, self.cost)]
        score = finite[0] + price * finite[1] + speed_price * finite[2]
        return np.argmin(np.where(missing, np.inf, score), axis=1)

    def totals(self, picked: np.ndarray) -> tuple[float, float, float]:
        rows = np.arange(len(self.names))
        return (
            float(self.loss[rows, picked].sum()),
            float(self.bytes[rows, picked].sum()),
            float(self.cost[rows, picked].sum()),
        )

    def recipe(self, picked: np.ndarray) -> Recipe:
        return Recipe(
            {name: self.options[row][int(col)] for row, (name, col) in enumerate(zip(self.names, picked, strict=True))}
        )


def choose(options: dict[str, list[Option]], objective: Objective) -> Recipe:
    """The recipe for ``objective``; ``RecipeBudgetError`` (naming the best reachable) when none meets it."""
    if not options or any(not o for o in options.values()):
        raise ValueError("every tensor needs at least one option")
    table = _Table(options)
    speed_prices = [0.0] if objective.max_cost is None else [0.0, *np.geomspace(1e-12, 1e3, 46)]
    for speed_price in speed_prices:
        picked = _solve(table, objective, speed_price)
        if picked is None:
            continue
        _, _, cost = table.totals(picked)
        if objective.max_cost is None or cost <= objective.max_cost:
            return _spend_leftover(table, picked, objective)
    raise _unreachable(table, objective)


def _solve(table: _Table, objective: Objective, speed_price: float) -> np.ndarray | None:
    """Bisect the byte price: the cheapest-in-loss pick within bytes, or the smallest within loss."""
    low, high = 1e-18, 1e6  # price of a byte in loss units; the search runs in log space
    best = None
    for _ in range(_BISECTIONS):
        price = float(np.sqrt(low * high))
        picked = table.pick(price, speed_price)
        loss, size, _ = table.totals(picked)
        if objective.max_bytes is not None:
            if size + objective.fixed_bytes <= objective.max_bytes:  # fits: try spending more bytes for less loss
                best, high = picked, price
            else:
                low = price
        else:
            assert objective.max_loss is not None
            if loss <= objective.max_loss:  # good enough: try fewer bytes
                best, low = picked, price
            else:
                high = price
    return best


def _spend_leftover(table: _Table, picked: np.ndarray, objective: Objective) -> Recipe:
    """Upgrades the relaxation left on the table, most loss saved per byte first, while every budget holds."""
    picked = picked.copy()
    if objective.max_bytes is None:
        return table.recipe(picked)
    while True:
        _, size, cost = table.totals(picked)
        best_gain, best_move = 0.0, None
        for row in range(len(table.names)):
            current = picked[row]
            for col in range(table.loss.shape[1]):
                saved = table.loss[row, current] - table.loss[row, col]
                extra_bytes = table.bytes[row, col] - table.bytes[row, current]
                extra_cost = table.cost[row, col] - table.cost[row, current]
                if saved <= 0 or size + extra_bytes + objective.fixed_bytes > objective.max_bytes:
                    continue
                if objective.max_cost is not None and cost + extra_cost > objective.max_cost:
                    continue
                gain = saved / max(extra_bytes, 1.0)
                if gain > best_gain:
                    best_gain, best_move = gain, (row, col)
        if best_move is None:
            return table.recipe(picked)
        picked[best_move[0]] = best_move[1]


def _unreachable(table: _Table, objective: Objective) -> RecipeBudgetError:
    if objective.max_bytes is not None:
        smallest = np.argmin(table.bytes + 1e-30 * table.loss, axis=1)
        loss, size, _ = table.totals(smallest)
        return RecipeBudgetError(
            f"no recipe fits in {objective.max_bytes:,} bytes: the smallest reaches "
            f"{int(size) + objective.fixed_bytes:,} bytes "
            f"(predicted mean KL {loss:.4f})",
            fix=BUDGET_FIX,
        )
    best = np.argmin(table.loss + 1e-30 * table.bytes, axis=1)
    loss, size, _ = table.totals(best)
    speed = "" if objective.max_cost is None else " at the required decode speed"
    return RecipeBudgetError(
        f"no recipe meets the loss budget (mean KL {objective.max_loss:.4f}){speed}: the most accurate reaches "
        f"predicted mean KL {loss:.4f} in {int(size) + objective.fixed_bytes:,} bytes",
        fix="loosen the target's budget, or lower min_decode_ratio",
    )
