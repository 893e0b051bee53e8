"""How much a turn renders, and what it feeds when the template's closing tail cannot go in.

On the real SmolLM2-135M-Instruct Q4_1 with a random non-zero adapter.  What is checked:

* an ordinary turn renders the history at most twice (its prompt and its closing tail), the
  re-rendering path three times, an SSW turn three times, and ``default_system`` is found
  once per template: a turn's cost must not grow with the square of the conversation's length;
  the tokens fed are still the ones the protocol prescribes (the prompt text the template adds
  after the cache's, the reply's sampled ids, the tail);
* a reply's closing tail that is refused (its feed fails) is written by the next turn, once,
  and the reply is not fed or written a second time;
* a reply that runs into the end of a tiny context (the turn raises) leaves the cache equal to
  the conversation's bookkeeping and writes each token of the turn once, also with a template
  whose tail is too long for the room that is left.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from ggufs import write_random_adapter

from deltamem_edge import Engine
from deltamem_edge._bindings import llama_lib
from deltamem_edge.conversation import Conversation
from deltamem_edge.defaults import default_model_path
from deltamem_edge.errors import EngineError
from deltamem_edge.sampling import SamplingParams

GREEDY = SamplingParams(temp=0.0)
TURNS = ["Hello! My favourite colour is green.", "And my cat is called Tiber.", "What colour do I like?",
         "Thanks, that is all."]
# SmolLM2's ChatML with a closing tail of more than 8 tokens after each assistant message (still prefix-stable)
LONG_TAIL = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content']}}"
             "{% if message['role'] == 'assistant' %}{{ '\n(end of the assistant message, thank you)' }}{% endif %}"
             "{{ '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(scope="module")
def smol(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("smol")
    model = default_model_path()
    return {
        "model": model,
        "adapter": write_random_adapter(d / "a.dmem.gguf", model, rank=8, seed=4),
        "ssw": write_random_adapter(d / "ssw.dmem.gguf", model, rank=8, seed=6, write_granularity="message_mean"),
    }


def kv_positions(conv: Conversation) -> int:
    mem = llama_lib.llama_get_memory(conv.engine._ctx)
    return llama_lib.llama_memory_seq_pos_max(mem, conv.session.seq) + 1


def cache_text(conv: Conversation) -> str:
    return conv.engine.detokenize(conv._kv, special=True)


def sample_plain_text(conv: Conversation, *, stop: bool = True) -> None:
    """Never sample a control token, so that a reply's text is its ids' text (``cache_text`` compares
    them); with ``stop=False`` not an end-of-generation token either: the reply runs on."""
    eng = conv.engine
    mask = np.array([eng.token_bytes(t, special=True) != eng.token_bytes(t) and not (stop and eng.is_eog(t))
                     for t in range(eng.n_vocab)])
    sample = conv._sampler.sample
    conv._sampler.sample = lambda logits: sample(np.where(mask, np.float32(-np.inf), logits))


def count_renders(conv: Conversation) -> list[tuple[int, bool]]:
    """(messages, generation prompt) per render of the conversation's template, from now on."""
    calls: list[tuple[int, bool]] = []
    render = conv._template.render

    def counting_render(messages, *, generation_prompt):
        calls.append((len(messages), generation_prompt))
        return render(messages, generation_prompt=generation_prompt)

    conv._template.render = counting_render
    return calls


def record_feeds(conv: Conversation) -> list[tuple[list[int], bool]]:
    """(ids, write) per call into the session, generated tokens included (they go through Session.feed)."""
    feeds: list[tuple[list[int], bool]] = []
    feed = conv.session.feed

    def recording_feed(ids, write=True, **kw):
        feeds.append(([int(i) for i in ids], bool(write)))
        return feed(ids, write=write, **kw)

    conv.session.feed = recording_feed
    return feeds


def test_an_ordinary_turn_renders_the_history_at_most_twice(smol, tmp_path):
    with Engine(smol["model"], smol["adapter"], n_ctx=1024, n_threads=1) as eng, \
            Conversation(eng, tmp_path / "m.state", sampling=GREEDY, max_new_tokens=12) as conv:
        sample_plain_text(conv)
        template = conv._template
        render = template.render  # unwrapped: the expected text, computed here, is not counted

        def tok(text: str) -> list[int]:
            return eng.tokenize(text, add_special=False, parse_special=True)

        calls = count_renders(conv)
        feeds = record_feeds(conv)
        for text in TURNS:
            calls.clear()
            feeds.clear()
            before = render(conv.messages, generation_prompt=False)
            reply = conv.say(text)
            assert len(calls) <= 2, calls  # the prompt and the closing tail (it was 4)
            # what is fed is what the protocol says: the text the template adds after the cache's ...
            prompt = render(conv.messages[:-1], generation_prompt=True)
            assert feeds[0] == (tok(prompt[len(before):]), True)
            # ... the reply's sampled ids, one at a time ...
            assert all(len(ids) == 1 and write for ids, write in feeds[1:-1])
            assert eng.detokenize([ids[0] for ids, _ in feeds[1:-1]]) == reply
            # ... and the closing tail; the cache then holds the transcript, and the bookkeeping says so
            full = render(conv.messages, generation_prompt=False)
            assert feeds[-1] == (tok(full[len(prompt) + len(reply):]), True)
            assert conv._rendered == full == cache_text(conv)
        assert conv.tokens_written == kv_positions(conv) == len(conv._kv)

        calls.clear()
        assert template.default_system() == template.default_system()  # found once per template (it was 2 each)
        assert calls == []

        conv._rendered = None  # the text of the cache unknown (what an eviction leaves): the re-rendering path
        conv.say("One more thing.")
        assert len(calls) <= 3, calls  # the prompt, the history once, the tail (it was 6)
        assert conv._rendered == render(conv.messages, generation_prompt=False) == cache_text(conv)


def test_a_segment_adapter_turn_renders_the_history_at_most_three_times(smol, tmp_path):
    with Engine(smol["model"], smol["ssw"], n_ctx=1024, n_threads=1) as eng, \
            Conversation(eng, tmp_path / "ssw.state", sampling=GREEDY, max_new_tokens=6) as conv:
        calls = count_renders(conv)
        for text in TURNS[:3]:
            calls.clear()
            conv.say(text)
            assert len(calls) <= 3, calls  # + the history without the generation prompt, for its ids (it was 6)


def test_a_refused_tail_is_written_once_by_the_next_turn_and_the_reply_not_again(smol, tmp_path):
    """The closing tail's feed fails (llama_decode refuses it: nothing changes).  The cache then holds
    the prompt and the reply; the next turn must add the tail and its own message, not the reply again."""
    with Engine(smol["model"], smol["adapter"], n_ctx=1024, n_threads=1) as eng, \
            Conversation(eng, tmp_path / "m.state", sampling=GREEDY, max_new_tokens=12) as conv:
        sample_plain_text(conv)
        system_text = cache_text(conv)  # the system prompt, written when the memory was new
        base = conv.tokens_written
        written: list[int] = []
        refuse = False
        feed = conv.session.feed

        def refusing_feed(ids, write=True, **kw):
            if refuse:
                raise EngineError("llama_decode failed (code 1)", hint="the KV cache may be full (code 1)")
            if write:
                written.extend(int(i) for i in ids)
            return feed(ids, write=write, **kw)

        conv.session.feed = refusing_feed
        finish = conv._finish_reply

        def finish_with_refused_tail(generated):
            nonlocal refuse
            refuse = True
            try:
                finish(generated)
            finally:
                refuse = False

        conv._finish_reply = finish_with_refused_tail
        first = conv.say(TURNS[0])
        del conv._finish_reply  # the next turns close their replies as usual
        after_first = (cache_text(conv), conv._rendered)
        conv.say(TURNS[1])

        full = conv._template.render(conv.messages, generation_prompt=False)
        assert first and full.count(first) == 1
        # every token of the transcript after the system prompt written once, in order: the reply not twice
        assert eng.detokenize(written, special=True) == full[len(system_text):]
        assert conv.tokens_written == base + len(written) == kv_positions(conv) == len(conv._kv)
        assert cache_text(conv) == full == conv._rendered  # and the cache holds the transcript once
        # after the refusal the bookkeeping named what the cache held: the prompt and the reply, no tail
        prompt = conv._template.render(conv.messages[:2], generation_prompt=True)
        assert after_first == (prompt + first, prompt + first)


@pytest.mark.parametrize("template", ["model", "long tail"])
def test_a_reply_that_runs_into_a_tiny_context_writes_each_token_once(smol, tmp_path, template):
    """The reply fills the context: generation's ``_make_room(64)`` finds nothing to evict and the turn
    raises.  SmolLM2's tail (2 tokens) still fits the 8 positions generation leaves; a tail of more than
    8 does not and is left out.  Either way the cache and the bookkeeping agree, the turn is kept, and
    the next turn (which must evict this one to fit) writes only its own tokens."""
    with Engine(smol["model"], smol["adapter"], n_ctx=1024, n_threads=1) as eng, \
            Conversation(eng, tmp_path / "tiny.state", sampling=GREEDY, max_new_tokens=200, context_limit=128,
                         system="Be brief.") as conv:
        if template == "long tail":  # the system message renders alike in both templates
            from llama_cpp.llama_chat_format import Jinja2ChatFormatter  # after deltamem_edge located libllama

            conv._template._gen = Jinja2ChatFormatter(LONG_TAIL, "", "", add_generation_prompt=True)
            conv._template._plain = Jinja2ChatFormatter(LONG_TAIL, "", "", add_generation_prompt=False)
        sample_plain_text(conv, stop=False)
        system_text = cache_text(conv)
        base = conv.tokens_written
        written: list[int] = []
        feed = conv.session.feed

        def counting_feed(ids, write=True, **kw):
            if write:
                written.extend(int(i) for i in ids)
            return feed(ids, write=write, **kw)

        conv.session.feed = counting_feed
        for text in ("Count to one hundred.", "Again, please."):
            start = len(written)
            with pytest.raises(EngineError, match="do not fit the context of 128"):
                conv.say(text)
            assert [m["role"] for m in conv.messages] == ["system", "user", "assistant"]  # the turn is kept
            assert conv.messages[1]["content"] == text
            assert conv.session.n_past == kv_positions(conv) == len(conv._kv) <= 128
            assert cache_text(conv) == conv._rendered  # the bookkeeping names what the cache holds
            # this turn wrote its message, the reply and (where it fit) the tail, once: the cache after the system
            assert eng.detokenize(written[start:], special=True) == cache_text(conv)[len(system_text):]
            assert conv.tokens_written == base + len(written)
