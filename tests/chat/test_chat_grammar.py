"""The grammars of dsv32.chat.grammar against the formats' own encoders and parsers: what the
encoder writes for valid arguments is accepted token by token, what breaks the schema, the choice
or the format is refused, and uniformly random walks through a grammar (every allowed token
equally likely: no model's preferences) always parse into calls whose arguments validate."""

import json
import random
import textwrap

import pytest
import torch
from tiny_tokenizers import chatml_bpe

from dsv32.chat import (
    EOS,
    THINK_END,
    ChatFormatError,
    parse_completion,
    render_tool_calls,
)
from dsv32.chat.grammar import chat_grammar
from dsv32.llama.grammar import chatml_grammar
from dsv32.engine.grammar import Grammar, GrammarVocab, mask_width, unpack_mask
from dsv32.llama.chatml import IM_END, ChatMLStreamParser, render_chatml_tool_calls
from dsv32.tokenizer import train_tokenizer

jsonschema = pytest.importorskip("jsonschema")
pytest.importorskip("llguidance")

WEATHER = {"type": "object", "required": ["city", "days"], "properties": {
    "city": {"type": "string", "maxLength": 12}, "days": {"type": "integer", "minimum": 1, "maximum": 14},
    "unit": {"type": "string", "enum": ["C", "F"]}, "at": {"type": "string", "pattern": "^[0-9]{2}:[0-9]{2}$"},
    "hours": {"type": "array", "maxItems": 2, "items": {"type": "integer", "minimum": 0, "maximum": 23}}}}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object"}}}]
SCHEMAS = {"get_weather": WEATHER, "get_time": {"type": "object"}}
NAMED = {"type": "function", "function": {"name": "get_weather"}}


def call(name, **args):
    return {"type": "function", "function": {"name": name, "arguments": args}}


@pytest.fixture(scope="module")
def v32(tmp_path_factory):
    tok = train_tokenizer([json.decoder.__file__, textwrap.__file__], 512, tmp_path_factory.mktemp("v32"))
    return tok, GrammarVocab(tok.tok.to_str(), [tok.eos_id], tok.vocab_size)


@pytest.fixture(scope="module")
def chatml():
    tok = chatml_bpe()
    return tok, GrammarVocab(tok.to_str(), [tok.token_to_id(IM_END), 0], tok.get_vocab_size())


def v32_grammar(tok, vocab, **kw):
    return Grammar.compile(chat_grammar(tok.special_ids, **kw), vocab)


def accepts(grammar: Grammar, ids: list[int]) -> bool:
    """Whether the grammar takes ids, token by token, to its end."""
    m = grammar.matcher()
    for t in ids:
        if not m.m.consume_token(t):
            return False
    return m.done


def walk(grammar: Grammar, vocab_size: int, rng: random.Random, limit=600) -> list[int] | None:
    """A uniformly random path through the grammar (None if longer than limit)."""
    m, row, out = grammar.matcher(), torch.zeros(mask_width(vocab_size), dtype=torch.int32), []
    while not m.done:
        if len(out) == limit:
            return None
        m.fill(row)
        allowed = unpack_mask(row[None], vocab_size)[0].nonzero().flatten().tolist()
        out.append(rng.choice(allowed))
        m.advance(out[-1])
    return out


def test_v32_forced_calls_accept_what_the_encoder_writes_and_refuse_the_rest(v32):
    tok, vocab = v32
    required = v32_grammar(tok, vocab, tools=TOOLS, tool_choice="required")
    single = v32_grammar(tok, vocab, tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    named = v32_grammar(tok, vocab, tools=TOOLS, tool_choice=NAMED)
    one = [call("get_weather", city="Par<is", days=3, unit="F", at="12:30", hours=[1, 23])]
    two = [call("get_weather", city="Paris", days=14), call("get_time")]
    for calls, ok in ((one, (True, True, True)), (two, (True, False, False)),
                      ([call("get_time")], (True, True, False)),
                      ([call("get_weather", city="Paris", days=15)], (False, False, False)),      # maximum
                      ([call("get_weather", city="Paris", days=3, unit="K")], (False, False, False)),  # enum
                      ([call("get_weather", city="Paris", days=3, at="9h")], (False, False, False)),  # pattern
                      ([call("get_weather", city="a much too long city", days=3)], (False,) * 3),  # maxLength
                      ([call("get_weather", city="Paris")], (False,) * 3),                        # required
                      ([call("get_date")], (False,) * 3)):
        ids = tok.encode(render_tool_calls(calls) + EOS)
        assert (accepts(required, ids), accepts(single, ids), accepts(named, ids)) == ok, calls
    assert not accepts(required, tok.encode("Sure." + render_tool_calls(one) + EOS))            # the block only


def test_v32_random_walks_parse_into_calls_that_validate(v32):
    tok, vocab = v32
    rng = random.Random(0)
    for choice in ("required", NAMED):
        grammar = v32_grammar(tok, vocab, tools=TOOLS, tool_choice=choice)
        for _ in range(20):
            ids = walk(grammar, vocab.vocab_size, rng)
            if ids is None:  # a random walk that goes on from call to call
                continue
            msg = parse_completion(tok.decode(ids), "chat")
            assert msg["content"] == "" and msg["tool_calls"]
            for c in msg["tool_calls"]:
                name = c["function"]["name"]
                assert name in SCHEMAS and (choice == "required" or name == "get_weather")
                jsonschema.validate(json.loads(c["function"]["arguments"]), SCHEMAS[name])


def test_v32_json_replies_in_chat_and_thinking_mode(v32):
    tok, vocab = v32
    obj = v32_grammar(tok, vocab, response_format={"type": "json_object"})
    assert accepts(obj, tok.encode('{"a": [1, {"b": null}], "c": "d"}' + EOS))
    assert not accepts(obj, tok.encode("[1]" + EOS)) and not accepts(obj, tok.encode('{"a":1}' + EOS))  # compact style
    schema = {"type": "json_schema", "json_schema": {"name": "w", "schema": WEATHER}}
    thinking = v32_grammar(tok, vocab, response_format=schema, thinking=True)
    text = 'Let me think. <b>\n' + THINK_END + '{"city": "Paris", "days": 2}' + EOS
    assert accepts(thinking, tok.encode(text))
    assert parse_completion(text, "thinking")["content"] == '{"city": "Paris", "days": 2}'
    assert not accepts(thinking, tok.encode('{"city": "Paris", "days": 2}' + EOS))  # the reasoning comes first


def test_chatml_forced_calls_and_json(chatml):
    tok, vocab = chatml
    special = {IM_END: tok.token_to_id(IM_END)}

    def grammar(**kw):
        return Grammar.compile(chatml_grammar(special, **kw), vocab)

    def ids(text):
        return tok.encode(text, add_special_tokens=False).ids

    required, named = grammar(tools=TOOLS, tool_choice="required"), grammar(tools=TOOLS, tool_choice=NAMED)
    two = render_chatml_tool_calls([call("get_weather", city="Paris", days=3, unit="C"), call("get_time")]) + IM_END
    one = render_chatml_tool_calls([call("get_weather", city="Paris", days=3)]) + IM_END
    assert accepts(required, ids(two)) and accepts(required, ids(one)) and accepts(named, ids(one))
    assert not accepts(named, ids(two))
    assert not accepts(required, ids(render_chatml_tool_calls([call("get_weather", city="Paris")]) + IM_END))
    rng = random.Random(1)
    for _ in range(20):
        walked = walk(named, vocab.vocab_size, rng)
        if walked is None:
            continue
        parser = ChatMLStreamParser()
        parser.feed(tok.decode(walked, skip_special_tokens=False))
        parser.finish()
        [c] = parser.message["tool_calls"]
        jsonschema.validate(json.loads(c["function"]["arguments"]), WEATHER)
    obj = grammar(response_format={"type": "json_object"})
    assert accepts(obj, ids('{"a": 1}' + IM_END)) and not accepts(obj, ids('{"a": 1}'))


@pytest.mark.parametrize("kw, match", [
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "cannot both hold"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "not among the tools"),
    ({"tool_choice": "required"}, "at least one tool"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}}, "must be a JSON schema"),
    ({"response_format": {"type": "json_object"}, "thinking": True, "chat_format": "chatml"}, "no thinking"),
])
def test_requests_that_cannot_hold_are_errors(kw, match):
    grammar = chatml_grammar if kw.pop("chat_format", "v32") == "chatml" else chat_grammar
    with pytest.raises(ChatFormatError, match=match):
        grammar({}, **kw)


def test_free_replies_have_no_grammar():
    for kw in ({}, {"tools": TOOLS}, {"tools": TOOLS, "tool_choice": "auto"}, {"tools": TOOLS, "tool_choice": "none"},
               {"response_format": {"type": "text"}}):
        assert chat_grammar({}, **kw) is None and chatml_grammar({}, **kw) is None
