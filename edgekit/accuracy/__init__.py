"""How much accuracy each variant lost: texts, metrics, evaluation, references, budgets, the CI gate, reports."""
