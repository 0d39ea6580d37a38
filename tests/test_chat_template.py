"""Chat templates: rendered as transformers renders them, and bounded against hostile ones (issue "No code from a
stranger's file", defects 7 and 14)."""

from __future__ import annotations

import time

import pytest
from tiny_models import CHAT_TEMPLATE, tiny_tokenizer

from edgekit.errors import UsageError
from edgekit.runtimes.chat_template import render_chat

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan? 東京 🦊"},
]
SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\n"
    "You are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TOOLS_STYLE = (
    "{{ bos_token }}{%- for m in messages -%}{%- if m.role == 'system' -%}[SYS]{{ m.content | trim }}[/SYS]"
    "{%- elif m.role == 'user' -%}[INST] {{ m.content }} [/INST]{%- else -%}{% generation %}{{ m.content }}"
    "{% endgeneration %}{{ eos_token }}{%- endif -%}{%- endfor -%}{{ {'n': messages | length} | tojson }}"
)


FILTERS = (  # filters jinja passes its context to: the bound wrappers dropped that and they failed or lied
    "{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | join(' / ') }}"
    "{{ messages | map(attribute='role') | unique | sort | join(',') }}{{ 'ab' | max }}{{ ['ab', 'xyz'] | min }}"
    "{{ messages[0].content | replace('terse', 'brief') }}{{ '%s-%d' | format('a', 2) }}{{ '{}!'.format('b') }}"
)


@pytest.mark.parametrize(
    "template", [CHAT_TEMPLATE, SMOLLM2_TEMPLATE, TOOLS_STYLE, FILTERS], ids=["tiny", "smollm2", "tools", "filters"]
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_what_transformers_renders(template: str, add_generation_prompt: bool) -> None:
    tokenizer = tiny_tokenizer()
    expected = tokenizer.apply_chat_template(
        CONVERSATION, chat_template=template, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    variables = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    ours = render_chat(template, CONVERSATION, add_generation_prompt=add_generation_prompt, variables=variables)
    assert ours == expected


@pytest.mark.parametrize(
    ("template", "phrase"),
    [
        ("{% for i in range(10**8) %}{% endfor %}", "passed 100000000 to a call"),
        ("{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}", "time limit"),
        ("{% set s = 'x' * 1000000 %}{% for a in s %}{% for b in s %}{% endfor %}{% endfor %}", "time limit"),
        ("{{ 'x' * 10**9 }}", "passed 1000000000"),
        ("{{ 'x' | center(10**9) }}", "passed 1000000000"),
        ("{{ 9 ** 9 ** 9 }}", "passed 387420489"),
        ("{% for i in range(1000000) %}{% endfor %}", "Range too big"),
        ("{% for i in range(100000) %}{{ 'x' * 100 }}{% endfor %}", "output passed"),
        ("{{ raise_exception('no system messages') }}", "failed (no system messages)"),
        ("{{ ''.__class__.__mro__ }}", "unsafe"),
        ("{% for %}", "does not compile"),
        ("{% macro f(n) %}{{ f(n) }}{% endmacro %}{{ f(1) }}", "ran out of resources"),
        # each step within the bounds, the product 6 GB (a red-team pass)
        ("{% set s = 'x' * 1048576 * 6000 %}{{ s | length }}", "a sequence of 6291456000 items"),
        ("{% set l = [0] * 1000000 * 500 %}{{ l | length }}", "a sequence of 500000000 items"),
        ("{% set s = 'x' * 1000000 %}{{ (s + s + s + s + s) | length }}", "a sequence of 5000000 items"),
        (
            "{% set s = 'a' * 1000 %}{% set t = s | replace('a', s) %}{{ t | replace('a', s) | length }}",
            "a string of 1001000000",
        ),
        ("{{ '%2000000000s' | format('x') }}", "a width of a million"),
        ("{{ '%2000000000s' % 'x' }}", "a width of a million"),
        ("{{ '{:>2000000000}'.format('x') | length }}", "a width of a million"),
        (
            "{% set ns = namespace(s='xxxxxxxx') %}{% for i in range(40) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}"
            "{{ ns.s | length }}",
            "built a value of",
        ),
        (
            "{% for i in range(30) %}{% set s = 'ab' ~ 'c' * 2 ** 20 ~ 'd' * 2 ** 20 ~ 'e' * 2 ** 20 ~ 'f' * 2 ** 20 %}"
            "{% endfor %}",
            "built a value of",
        ),
        ("{{" + "(" * 300 + "1" + ")" * 300 + "}}", "nested too deeply"),  # jinja's parser recursed out
        # each under the bound alone, a gigabyte together (a red-team pass)
        ("{{ ('{0:>999999}' * 1000).format('x') }}", "widths of 999999000 characters in all"),
        ("{% set l = ['y'] * 100000 %}{{ ('a' * 100).join(l) }}", "joined a string of 10099900 characters"),
        ("{% set l = ['y'] * 100000 %}{{ l | join('a' * 100) }}", "joined a string of 10099900 characters"),
    ],
)
def test_a_hostile_template_is_a_one_line_error_within_seconds(template: str, phrase: str) -> None:
    started = time.monotonic()
    with pytest.raises(UsageError) as info:
        render_chat(template, CONVERSATION)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert phrase in message and "\n" not in message and "--raw" in message


def test_transformers_rendering_a_source_template_is_bounded_too() -> None:
    """The build renders the source's template with transformers as well: a template that behaved under
    edgekit's renderer and looped under transformers' hung the build."""
    from edgekit.runtimes.chat_template import TemplateLimitError, foreign_template_bounds

    tokenizer = tiny_tokenizer()
    looping = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    started = time.monotonic()
    with pytest.raises(TemplateLimitError, match="time limit"), foreign_template_bounds(time_limit_s=0.5):
        tokenizer.apply_chat_template(CONVERSATION, chat_template=looping, tokenize=False)
    assert time.monotonic() - started < 5
