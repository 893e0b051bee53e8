"""The model's chat template: messages to the text the model is fed.

Why a module of its own: the conversation (to feed turns) and the training data
(``train/episodes.py``, to lay out the same tokens) must render messages exactly alike, so
there is one renderer, with no engine session or KV cache attached.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

CHATML = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
Message = dict[str, str]


class ChatTemplate:
    """The model's Jinja chat template, rendered like llama-cpp-python does."""

    def __init__(self, engine: Engine) -> None:
        from llama_cpp.llama_chat_format import Jinja2ChatFormatter

        source = engine.meta("tokenizer.chat_template")
        self.is_default = source is None
        source = source or CHATML

        def tok_text(key: str) -> str:
            value = engine.meta(key)
            return engine.detokenize([int(value)], special=True) if value not in (None, "") else ""

        bos, eos = tok_text("tokenizer.ggml.bos_token_id"), tok_text("tokenizer.ggml.eos_token_id")
        self._gen = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=True)
        self._plain = Jinja2ChatFormatter(source, eos, bos, add_generation_prompt=False)
        self._default_system = self._find_default_system()  # every user asks for it at once

    def render(self, messages: list[Message], *, generation_prompt: bool) -> str:
        if not messages:
            return ""
        fmt = self._gen if generation_prompt else self._plain
        return fmt(messages=messages).prompt

    def generation_prompt(self, messages: list[Message], *, rendered: str | None = None) -> str:
        """The text the template adds for the assistant's turn (SSW gives it id -1, like upstream).

        ``rendered``: ``render(messages, generation_prompt=True)`` when the caller has it already
        (the conversation does: its prompt), so that only the rendering without the prompt is made.
        """
        with_prompt = self.render(messages, generation_prompt=True) if rendered is None else rendered
        without = self.render(messages, generation_prompt=False)
        return with_prompt[len(without):] if with_prompt.startswith(without) else ""

    def default_system(self) -> str | None:
        """The system prompt the template inserts by itself when none is given (SmolLM2 does).

        Found by rendering a conversation with and without a marker system message.  We make it
        an explicit system message so that it is written into memory once, not once per run, and
        so that evicting old turns never cuts it.

        Found once, when the template is loaded (``set_context`` asks for it with every request): it
        depends on the template alone (a template that prints today's date keeps the first day's).
        """
        return self._default_system

    def _find_default_system(self) -> str | None:
        marker = "\x00"
        user = {"role": "user", "content": "a"}
        try:
            bare = self.render([user], generation_prompt=False)
            marked = self.render([{"role": "system", "content": marker}, user], generation_prompt=False)
        except Exception:  # templates that reject a system role
            return None
        if marker not in marked:
            return None
        before, after = marked.split(marker, 1)
        if bare.startswith(before) and bare.endswith(after) and len(bare) > len(before) + len(after):
            return bare[len(before):len(bare) - len(after)]
        return None
