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


@pytest.mark.parametrize("template", [CHAT_TEMPLATE, SMOLLM2_TEMPLATE, TOOLS_STYLE], ids=["tiny", "smollm2", "tools"])
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
    ],
)
def test_a_hostile_template_is_a_one_line_error_within_seconds(template: str, phrase: str) -> None:
    started = time.monotonic()
    with pytest.raises(UsageError) as info:
        render_chat(template, CONVERSATION)
    assert time.monotonic() - started < 5
    message = str(info.value)
    assert phrase in message and "\n" not in message and "--raw" in message
