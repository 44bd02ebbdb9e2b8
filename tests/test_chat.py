"""Fine-tuning on conversations: the assistant's tokens of a chat template (against transformers'
return_assistant_tokens_mask), prepare_chat's files, PackedLoader's rows, and `pyllm train` on
*.jsonl conversations (resume, gradient accumulation)."""
from __future__ import annotations

import errno
import io
import json
import os
import random
import shutil
import sys

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyllm import cli, data
from pyllm.tokenizer import Tokenizer
from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_chat_spans, hf_chat_tokens

from helpers import run_torchrun

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

# ChatML, as Qwen's and SmolLM's templates write it; MARKED puts {% generation %} around what the
# assistant says (its reply and the end of its turn), PLAIN is the same template without.
CHATML = ("{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' %}"
          "{% generation %}{{ m['content'] | trim }}<|im_end|>\n{% endgeneration %}{% else %}"
          "{{ m['content'] | trim }}<|im_end|>\n{% endif %}{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
MARKED, PLAIN = CHATML, CHATML.replace("{% generation %}", "").replace("{% endgeneration %}", "")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def conversation(rng: random.Random, turns: int) -> list[dict]:
    words = ["def", "f(x):", "return", "x", "+", "1", "é", "größer", "\n", "  ", "日本", "?"]
    say = lambda: " ".join(rng.choice(words) for _ in range(rng.randint(1, 8)))  # noqa: E731
    messages = [{"role": "system", "content": "be brief"}] if rng.random() < 0.5 else []
    for _ in range(turns):
        messages += [{"role": "user", "content": say()}, {"role": "assistant", "content": say()}]
    return messages


def make_folder(path, template: str, kind: str = "byte-level", model: bool | str = False):
    """A Hugging Face checkpoint folder: a tokenizer trained here (byte-level, or SentencePiece-style
    as Llama 2's), the chat template and eos in tokenizer_config.json, and with model a small LLaMA
    (model="mixtral": a small Mixtral, 4 experts, 2 per token)."""
    path.mkdir(parents=True, exist_ok=True)
    texts = [" ".join(conversation(random.Random(i), 2)[-1]["content"] for _ in range(3)) for i in range(200)]
    texts += [f"what is {i} plus {i + 1}? {2 * i + 1}" for i in range(100)]
    if kind == "byte-level":
        hf = tokenizers.Tokenizer(tokenizers.models.BPE())
        hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
        hf.decoder = tokenizers.decoders.ByteLevel()
        trainer = tokenizers.trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                                 initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    else:  # Llama 2's form: "▁" for spaces, one put first, byte fallback
        hf = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
        hf.normalizer = tokenizers.normalizers.Sequence([tokenizers.normalizers.Prepend("\u2581"),
                                                         tokenizers.normalizers.Replace(" ", "\u2581")])
        hf.decoder = tokenizers.decoders.Sequence([
            tokenizers.decoders.Replace("\u2581", " "), tokenizers.decoders.ByteFallback(),
            tokenizers.decoders.Fuse(), tokenizers.decoders.Strip(" ", 1, 0)])
        trainer = tokenizers.trainers.BpeTrainer(
            vocab_size=700, special_tokens=["<unk>", "<s>", "</s>", *SPECIALS, *(f"<0x{b:02X}>" for b in range(256))],
            limit_alphabet=60, show_progress=False)
    hf.train_from_iterator(texts, trainer)
    hf.save(str(path / "tokenizer.json"))
    bos = "<s>" if kind != "byte-level" else ""
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": template, "eos_token": "<|im_end|>",
        **({"bos_token": bos} if bos else {})}))
    shape = dict(vocab_size=hf.get_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                 eos_token_id=hf.token_to_id("<|im_end|>"))
    if model == "mixtral":
        transformers.MixtralForCausalLM(transformers.MixtralConfig(
            **shape, num_local_experts=4, num_experts_per_tok=2)).save_pretrained(path)
    elif model:
        transformers.LlamaForCausalLM(transformers.LlamaConfig(**shape)).save_pretrained(path)
    return path


@pytest.fixture(scope="module", params=["byte-level", "sentencepiece"])
def folders(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    marked, plain = make_folder(root / "marked", MARKED, request.param), root / "plain"
    plain.mkdir()
    (plain / "tokenizer.json").write_text((marked / "tokenizer.json").read_text())
    config = json.loads((marked / "tokenizer_config.json").read_text())
    (plain / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": PLAIN}))
    return marked, plain, Tokenizer.from_hf(marked / "tokenizer.json"), \
        transformers.AutoTokenizer.from_pretrained(marked)


def transformers_ids_and_mask(hf_tokenizer, messages):
    out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
    return list(out["input_ids"]), list(out["assistant_masks"])


def test_assistant_tokens_as_transformers_marks_them(folders):
    # A {% generation %} template: the ids and the mask transformers' apply_chat_template gives;
    # the same template without the markers: the same mask, found by rendering prefixes.
    marked, plain, ours, theirs = folders
    rng = random.Random(0)
    for turns in (1, 2, 3):
        messages = conversation(rng, turns)
        ids, mask = hf_chat_tokens(marked, ours, messages)
        assert (ids, mask) == transformers_ids_and_mask(theirs, messages)
        assert hf_chat_tokens(plain, ours, messages) == (ids, mask)
        assert sum(mask) > 0 and mask.count(1) < len(mask)
        # what the mask marks decodes to the replies and their end of turn
        text = ours.decode([i for i, m in zip(ids, mask) if m])
        for m in messages:
            if m["role"] == "assistant":
                assert m["content"].strip() in text
        assert text.count("<|im_end|>") == turns
    # OpenAI's "weight": 0 on an assistant message: in the context, not trained on (it had been)
    messages = conversation(rng, 2)
    first = next(i for i, m in enumerate(messages) if m["role"] == "assistant")
    messages[first] = {**messages[first], "weight": 0}
    for folder in (marked, plain):
        ids, mask = hf_chat_tokens(folder, ours, messages)
        trained = ours.decode([i for i, m in zip(ids, mask) if m])
        assert messages[first]["content"].strip() not in trained and trained.count("<|im_end|>") == 1
    with pytest.raises(ValueError, match="weight"):
        hf_chat_tokens(marked, ours, [*messages[:-1], {**messages[-1], "weight": 0.5}])


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(replies=st.lists(st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=20),
                        min_size=1, max_size=3))
def test_assistant_tokens_hypothesis(folders, replies):
    marked, plain, ours, theirs = folders
    messages = []
    for i, reply in enumerate(replies):
        messages += [{"role": "user", "content": f"q{i} é"}, {"role": "assistant", "content": reply}]
    got = hf_chat_tokens(marked, ours, messages)
    assert got == transformers_ids_and_mask(theirs, messages)
    if all(r.strip() == r or not r.strip() for r in replies):  # trim does not reach across a marker
        assert hf_chat_tokens(plain, ours, messages) == got


def test_template_rewriting_earlier_turns_is_refused(tmp_path):
    # Qwen3's kind: earlier assistant turns lose their reasoning, so prefixes render differently.
    template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{% if m['role'] == 'assistant' and not loop.last %}"
                "{{ m['content'].split('</think>')[-1] }}{% else %}{{ m['content'] }}{% endif %}<|im_end|>\n{% endfor %}"
                "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    folder = tmp_path / "f"
    folder.mkdir()
    (folder / "tokenizer_config.json").write_text(json.dumps({"chat_template": template}))
    messages = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>x</think>b"},
                {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>y</think>d"}]
    with pytest.raises(ValueError, match="generation"):
        hf_chat_spans(folder, messages)
    assert hf_chat_spans(folder, messages[:2])[1] == [(len("<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\n"),
                                                       len(hf_chat_spans(folder, messages[:2])[0]))]


# What apply_chat_template gives a template besides the messages, and how it hands them over.
INPUTS_TEMPLATE = (
    "{% if tools is not none %}<|im_start|>system\nTools: {{ tools | tojson }}<|im_end|>\n{% endif %}"
    "{% if documents is not none %}[documents]{% endif %}{% if bos_token is defined %}[bos]{% endif %}"
    "{% if enable_thinking is defined and not enable_thinking %}[no thinking]{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% if m.reasoning_content is defined %}<think>{{ m.reasoning_content }}</think>{% endif %}"
    "{% if m.thinking is defined %}[thinking]{% endif %}{% if m.tool_calls is defined %}{{ m.tool_calls | tojson }}"
    "{% endif %}{{ m['content'] }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% endif %}")


def test_template_inputs_as_transformers_gives_them(folders, tmp_path):
    # transformers drops a message's None values (a JSONL row's "content": null had rendered "None",
    # and been trained on), puts a reasoning under each of its names ("reasoning" had given Qwen3's
    # template an empty <think>), renders with tools and documents None when not given, passes only
    # the special tokens the folder sets, and TRL hands a row's "tools" and "chat_template_kwargs"
    # columns to the template (they had been dropped: tool calls trained without their schemas).
    _, _, ours, _ = folders
    folder = tmp_path / "inputs"
    folder.mkdir()
    (folder / "tokenizer.json").write_text((folders[0] / "tokenizer.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                              "chat_template": INPUTS_TEMPLATE, "eos_token": "<|im_end|>"}))
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "2 + 2?", "tool_calls": None},
                {"role": "assistant", "content": None, "reasoning": "add them",
                 "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2, "b": 2}}}]},
                {"role": "tool", "content": "4"}, {"role": "assistant", "content": "4", "thinking": None}]
    for kwargs in (dict(), dict(tools=tools), dict(tools=tools, enable_thinking=False), dict(documents=[])):
        for generation_prompt in (False, True):
            want = theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt,
                                              **kwargs)
            assert hf_chat_prompt(folder, messages, generation_prompt, **kwargs) == want, kwargs
    text, spans = hf_chat_spans(folder, messages, tools=tools)
    assert text == theirs.apply_chat_template(messages, tokenize=False, tools=tools) and "None" not in text
    assert [text[a:b] for a, b in spans] == ['<think>add them</think>[thinking][{"function": {"name": "add", '
                                             '"arguments": {"a": 2, "b": 2}}}]<|im_end|>\n', "4<|im_end|>\n"]
    # the data path: the row's tools and template variables reach the template
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"messages": messages[:2], "tools": tools,
                                "chat_template_kwargs": {"enable_thinking": False}}) + "\n")
    example, = data.read_conversations(path)
    ids, _ = data.example_tokens(example, ours, folder)
    assert ids == list(theirs.apply_chat_template(messages[:2], tools=tools, enable_thinking=False,
                                                  return_dict=True)["input_ids"])
    # a "tools" column stored as a JSON string (datasets' way with schemas of differing shapes): read as
    # TRL's SFTTrainer reads it (json.loads); it had been refused (from the tool-calling audit)
    path.write_text(json.dumps({"messages": messages[:2], "tools": json.dumps(tools)}) + "\n")
    assert data.read_conversations(path)[0]["template"]["tools"] == tools
    path.write_text(json.dumps({"messages": messages[:2], "tools": {"add": 1}}) + "\n")
    with pytest.raises(ValueError, match="tools.jsonl:1: \"tools\" must be a list"):
        data.read_conversations(path)
    # named templates (Hermes-2-Pro's, Command-R's: a list in tokenizer_config.json; transformers 5's
    # save_pretrained: additional_chat_templates/tool_use.jinja): "tool_use" where tools are given, as
    # transformers picks it (the default had been rendered: every tool schema and call left out)
    named = tmp_path / "named"
    named.mkdir()
    (named / "tokenizer.json").write_text((folders[0] / "tokenizer.json").read_text())
    default = "{% for m in messages %}{{ m['content'] }}<|im_end|>{% endfor %}"
    tool_use = "[tools: {{ tools | tojson }}]" + default
    (named / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>",
        "chat_template": [{"name": "default", "template": default}, {"name": "tool_use", "template": tool_use}]}))
    theirs = transformers.AutoTokenizer.from_pretrained(named)
    user = [{"role": "user", "content": "2 + 2?"}]
    for kwargs in (dict(), dict(tools=tools)):
        assert hf_chat_prompt(named, user, False, **kwargs) == theirs.apply_chat_template(user, tokenize=False,
                                                                                          **kwargs)
    assert hf_chat_prompt(named, user, False, tools=tools).startswith("[tools:")
    theirs.save_pretrained(tmp_path / "saved")  # (its layout: chat_template.jinja and additional_chat_templates/)
    assert hf_chat_prompt(tmp_path / "saved", user, False, tools=tools) == hf_chat_prompt(named, user, False, tools=tools)
    # a conversation opening with the assistant, under a template that reads messages[0]
    (folder / "chat_template.jinja").write_text("{{ messages[0]['role'] }}|" + INPUTS_TEMPLATE)
    opening = [{"role": "assistant", "content": "hello"}, {"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match="opens with an assistant message"):
        hf_chat_spans(folder, opening)
    assert hf_chat_spans(folder, [{**opening[0], "weight": 0}, *opening[1:]])[1] == []


def test_template_changes_are_seen(folders, tmp_path):
    # The compiled template is cached per folder, and compiled again when the file changes.
    marked, _, ours, _ = folders
    folder = tmp_path / "f"
    folder.mkdir()
    config = json.loads((marked / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "A{{ messages[0]['content'] }}"}))
    assert hf_chat_spans(folder, [{"role": "user", "content": "x"}])[0] == "Ax"
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": "BB{{ messages[0]['content'] }}"}))
    assert hf_chat_spans(folder, [{"role": "user", "content": "x"}])[0] == "BBx"
    # chat_template.jinja wins over tokenizer_config.json's, as in transformers; bos / eos kept only
    # in special_tokens_map.json (older folders) are the template's too
    (folder / "chat_template.jinja").write_text("{{ bos_token }}C{{ messages[0]['content'] }}{{ eos_token }}")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": {"content": "</s>"}}))
    bare = {k: v for k, v in config.items() if k not in ("bos_token", "eos_token")}
    (folder / "tokenizer_config.json").write_text(json.dumps({**bare, "chat_template": "BB{{ messages[0]['content'] }}"}))
    assert hf_chat_spans(folder, [{"role": "user", "content": "x"}])[0] == "<s>Cx</s>"


# --- prepare_chat and the files ------------------------------------------------------------------

def write_jsonl(path, conversations):
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in conversations))
    return path


def test_prepare_chat_files(folders, tmp_path):
    marked, _, ours, _ = folders
    rng = random.Random(1)
    conversations = [conversation(rng, rng.randint(1, 3)) for _ in range(30)]
    conversations[7] = [{"role": "user", "content": "hello"}]  # nothing to learn from: left out
    path = write_jsonl(tmp_path / "chats.jsonl", conversations)
    assert data.is_chat_data([path]) and not data.is_chat_data([tmp_path]) and not data.is_chat_data(None)
    stats = data.prepare_chat([path], ours, marked, tmp_path / "out", val_fraction=0.1, show_progress=False)
    assert stats["without_assistant"] == 1 and stats["train_conversations"] + stats["val_conversations"] == 29
    expected = {"train": [c for i, c in enumerate(conversations) if i % 10 != 9 and i != 7],
                "val": [c for i, c in enumerate(conversations) if i % 10 == 9]}
    for name, convs in expected.items():
        tokens = np.asarray(data.open_tokens(tmp_path / "out" / f"{name}.bin"))
        offsets = np.load(tmp_path / "out" / f"{name}.docs.npy")
        mask = np.load(tmp_path / "out" / f"{name}.mask.npy")
        assert len(offsets) == len(convs) + 1 and len(mask) == len(tokens) == offsets[-1]
        for k, messages in enumerate(convs):
            ids, want = hf_chat_tokens(marked, ours, messages)
            assert tokens[offsets[k]:offsets[k + 1]].tolist() == ids and mask[offsets[k]:offsets[k + 1]].tolist() == want


@pytest.mark.parametrize("line, message", [
    ("{not json", "chats.jsonl:2: not JSON"),
    (json.dumps({"text": "hi"}), "chats.jsonl:2: expected"),
    (json.dumps({"messages": [{"content": "no role"}]}), "chats.jsonl:2: expected"),
    (json.dumps([{"messages": []}]), "chats.jsonl:2: a JSON list, not an object: JSON Lines holds one"),
    ('{"messages": "caf\xe9"}', r"chats.jsonl: not UTF-8 text \(byte 0xe9 on line 1 or later\)"),
])
def test_read_conversations_says_which_line(tmp_path, line, message):
    # (a row that is not an object had read as {}: "expected ..."; bytes not UTF-8 raised
    # UnicodeDecodeError without the file's name)
    path = tmp_path / "chats.jsonl"
    path.write_bytes((json.dumps({"messages": [{"role": "user", "content": "a"}]}) + "\n" + line + "\n").encode("latin-1"))
    with pytest.raises(ValueError, match=message):
        data.read_conversations(path)


def test_a_byte_order_mark_is_read_past(tmp_path):
    # JSON Lines saved with a UTF-8 BOM (Windows editors) had been refused ("Unexpected UTF-8 BOM")
    path = tmp_path / "chats.jsonl"
    talk = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]
    path.write_bytes(("\ufeff" + json.dumps({"messages": talk}) + "\n").encode())
    assert data.is_chat_data([path]) and data.read_conversations(path) == [{"messages": talk, "train_from": 0}]


def test_prompt_completion_examples(folders, tmp_path):
    # TRL's prompt-completion formats. Messages: the conversation's tokens, the completion's
    # assistant turns alone trained (not an assistant turn inside the prompt). Text: prompt then
    # completion, each encoded alone (a SentencePiece-style tokenizer's completion without its "▁"
    # prefix), between the model's document markers, the completion trained.
    marked, plain, ours, _ = folders
    rng = random.Random(5)
    talk = conversation(rng, 2)
    prompt, completion = talk[:-1], talk[-1:]
    path = tmp_path / "pc.jsonl"
    path.write_text(json.dumps({"prompt": prompt, "completion": completion}) + "\n"
                    + json.dumps({"prompt": "def f(x):", "completion": " return x + 1"}) + "\n")
    chat, text = data.read_conversations(path)
    assert chat == {"messages": talk, "train_from": len(prompt)}
    for folder in (marked, plain):
        ids, mask = data.example_tokens(chat, ours, folder)
        full_ids, full_mask = hf_chat_tokens(folder, ours, talk)
        prompt_ids, prompt_mask = hf_chat_tokens(folder, ours, prompt)  # marks the prompt's assistant turn
        assert ids == full_ids and full_ids[:len(prompt_ids)] == prompt_ids
        assert mask == [m - (prompt_mask[j] if j < len(prompt_mask) else 0) for j, m in enumerate(full_mask)]
        assert 0 < sum(mask) < sum(full_mask)
    ids, mask = data.example_tokens(text, ours, None, doc_start=[7], doc_end=9)
    head, tail = [7, *ours.encode_ordinary("def f(x):")], [*ours._encode_continuation(" return x + 1", "def f(x):"), 9]
    assert ids == head + tail and mask == [0] * len(head) + [1] * len(tail)
    # the data's text, no space of the tokenizer's own: a SentencePiece-style completion encoded alone
    # had started with a "▁" (Llama 2's " Paris." as "▁", "▁P", ...)
    assert ours.decode(tail[:-1]) == " return x + 1" and ours.decode(ids[1:-1]).lstrip() == "def f(x): return x + 1"
    assert (tail[:-1] == ours.encode_ordinary(" return x + 1")) == (ours._spm is None)
    with pytest.raises(ValueError, match="need a chat template"):
        data.example_tokens(chat, ours, None)
    path.write_text(json.dumps({"prompt": "a", "completion": [{"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(ValueError, match="pc.jsonl:1: expected"):
        data.read_conversations(path)
    assert data.is_chat_data([write_jsonl(tmp_path / "m.jsonl", [talk])])


def test_train_on_text_prompt_completion_without_a_chat_template(chat_run_inputs, tmp_path):
    # A base model's folder (no chat template): text pairs train, the sample is a continuation.
    folder, _ = chat_run_inputs
    base = tmp_path / "base"
    base.mkdir()
    for f in folder.iterdir():
        if f.name != "tokenizer_config.json":
            (base / f.name).write_bytes(f.read_bytes())
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"what is {i} plus {i}?", "completion": f" {2 * i}"}) + "\n"
                             for i in range(60)))
    assert cli.main(train_args(base, pairs, tmp_path / "run", "--max-steps", "3", "--batch-size", "4",
                               "--sample-tokens", "3")) == 0
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["chat"] is False and data.has_documents(tmp_path / "run" / "data" / "train.bin")
    mask = np.load(tmp_path / "run" / "data" / "train.mask.npy")
    offsets = np.load(tmp_path / "run" / "data" / "train.docs.npy")
    assert mask[offsets[:-1]].sum() == 0 and mask[offsets[1:] - 1].all()  # prompts untrained, the end trained


def test_prepare_chat_needs_two_conversations(folders, tmp_path):
    marked, _, ours, _ = folders
    path = write_jsonl(tmp_path / "chats.jsonl", [conversation(random.Random(0), 1)])
    with pytest.raises(ValueError, match="at least 2"):
        data.prepare_chat([path], ours, marked, tmp_path / "out", show_progress=False)


def test_prepared_files_are_written_as_they_are_tokenized(folders, tmp_path, monkeypatch):
    # prepare_chat / prepare_preferences / prepare_kto write their files a batch of documents at a
    # time (every example, held to the end, had taken ~14x the JSON Lines' size): the same bytes
    # for any batch, each .npy np.save's own; a run stopped part-way leaves the earlier set as it
    # was and no temp file beside it (nor a folder it made).
    marked, _, ours, _ = folders
    rng = random.Random(2)
    chats = [conversation(rng, rng.randint(1, 3)) for _ in range(25)]
    chats[4] = [{"role": "user", "content": "hello"}]  # left out
    inputs = {"chat": write_jsonl(tmp_path / "chats.jsonl", chats), "preferences": tmp_path / "prefs.jsonl",
              "kto": tmp_path / "kto.jsonl"}
    inputs["preferences"].write_text("".join(json.dumps({"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected":
                                                         f" {i}" if i % 7 else "", "margin": i / 3}) + "\n"
                                             for i in range(25)))
    inputs["kto"].write_text("".join(json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}" if i % 7 else "",
                                                 "label": i % 3 > 0}) + "\n" for i in range(25)))
    prepare = {"chat": data.prepare_chat, "preferences": data.prepare_preferences, "kto": data.prepare_kto}
    sides = {"chat": {".rows.jsonl"}, "preferences": {".pairs.npy", ".margins.npy"},
             "kto": {".pairs.npy", ".labels.npy"}}
    write_units = data._write_units
    for kind, path in inputs.items():
        made = []
        for batch in (512, 1, 3):
            monkeypatch.setattr(data, "_write_units", lambda *a, **k: write_units(*a, **k, batch_docs=batch))
            out = tmp_path / f"{kind}-{batch}"
            prepare[kind]([path], ours, marked, out, val_fraction=0.2, show_progress=False)
            made.append({f.name: f.read_bytes() for f in sorted(out.iterdir())})
        assert made[0] == made[1] == made[2]
        assert set(made[0]) == {split + side for split in ("train", "val")
                                for side in {".bin", ".docs.npy", ".mask.npy", *sides[kind]}}
        for name, content in made[0].items():
            if name.endswith(".npy"):
                saved = io.BytesIO()
                np.save(saved, np.load(io.BytesIO(content)))
                assert saved.getvalue() == content, name
    out = tmp_path / "chat-512"
    before = {f.name: f.read_bytes() for f in out.iterdir()}
    monkeypatch.setattr(data, "_write_units", lambda *a, **k: write_units(*a, **k, batch_docs=2))
    tokens, calls = data.example_tokens, []

    def stopped(*args, **kwargs):  # (a Ctrl-C after some batches were written)
        calls.append(1)
        if len(calls) == 19:
            raise KeyboardInterrupt
        return tokens(*args, **kwargs)

    monkeypatch.setattr(data, "example_tokens", stopped)
    for where in (out, tmp_path / "new"):
        calls.clear()
        with pytest.raises(KeyboardInterrupt):
            data.prepare_chat([inputs["chat"]], ours, marked, where, show_progress=False)
    assert {f.name: f.read_bytes() for f in out.iterdir()} == before and not (tmp_path / "new").exists()


def test_a_full_disk_leaves_no_temp_file(folders, tmp_path, monkeypatch):
    # ENOSPC part-way: the buffered temp files' close (in abort) flushes again and fails again; each
    # must still be removed (they had all been left: gigabytes, hidden, on the disk that is full;
    # from the review of the streamed prepare).
    marked, _, ours, _ = folders
    rng = random.Random(0)
    path = write_jsonl(tmp_path / "chats.jsonl", [conversation(rng, 2) for _ in range(40)])
    real = os.fdopen

    class Full(io.FileIO):  # a disk with `left` bytes free, shared by every file: a part written, then ENOSPC
        left = [0]

        def write(self, b):
            if self.left[0] <= 0:
                raise OSError(errno.ENOSPC, "No space left on device")
            n = min(len(b), self.left[0])
            self.left[0] -= n
            return super().write(bytes(memoryview(b)[:n]))

    def fdopen(fd, mode="r", *args, **kwargs):
        if mode in ("wb", "w+b"):
            return (io.BufferedRandom if "+" in mode else io.BufferedWriter)(Full(fd, "r+" if "+" in mode else "w"))
        return real(fd, mode, *args, **kwargs)

    monkeypatch.setattr(os, "fdopen", fdopen)
    for left in (0, 500, 3000):
        Full.left[0] = left
        out = tmp_path / f"out{left}"
        out.mkdir()
        with pytest.raises(OSError, match="No space"):
            data.prepare_chat([path], ours, marked, out, val_fraction=0.25, show_progress=False)
        assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]


def test_a_failed_run_removes_the_folders_it_made(folders, tmp_path):
    # (all of them, innermost first, while empty; a folder of the user's never)
    marked, _, ours, _ = folders
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps({"prompt": "a", "completion": "b" if i % 2 == 0 else ""}) + "\n"
                            for i in range(6)))  # no val example with a completion
    with pytest.raises(ValueError, match="no val"):
        data.prepare_chat([path], ours, marked, tmp_path / "new" / "a" / "b", val_fraction=0.5, show_progress=False)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    with pytest.raises(ValueError, match="no val"):
        data.prepare_chat([path], ours, marked, tmp_path / "mine" / "out", val_fraction=0.5, show_progress=False)
    assert (tmp_path / "mine").is_dir() and not (tmp_path / "mine" / "out").exists()


@pytest.mark.parametrize("rewrite", ["emptied", "first removed", "doubled"])
def test_examples_changed_between_the_passes_are_refused(folders, tmp_path, monkeypatch, rewrite):
    # The lines are read twice; a file rewritten in between had its first pass's labels (KTO) put on
    # other examples, lines past the count dropped, or a bare StopIteration raised.
    marked, _, ours, _ = folders
    path = tmp_path / "kto.jsonl"
    rows = [json.dumps({"prompt": f"{i} + 1 =", "completion": f" {i + 1}", "label": i % 2 == 0}) for i in range(6)]
    path.write_text("".join(r + "\n" for r in rows))
    after = {"emptied": [], "first removed": rows[1:], "doubled": rows + rows}[rewrite]
    split = data._val_split

    def then_rewrite(*args, **kwargs):  # (called between the passes)
        in_val = split(*args, **kwargs)
        path.write_text("".join(r + "\n" for r in after))
        return in_val

    monkeypatch.setattr(data, "_val_split", then_rewrite)
    with pytest.raises(ValueError, match="changed while"):
        data.prepare_kto([path], ours, marked, tmp_path / "out", val_fraction=0.5, show_progress=False)
    assert not (tmp_path / "out").exists()


def test_inputs_may_be_any_iterable(folders, tmp_path):
    # (the two passes had found an iterator empty the second time: a bare StopIteration)
    marked, _, ours, _ = folders
    path = write_jsonl(tmp_path / "chats.jsonl", [conversation(random.Random(i), 1) for i in range(4)])
    stats = data.prepare_chat(iter([path]), ours, marked, tmp_path / "out", val_fraction=0.5, show_progress=False)
    assert stats["train_conversations"] + stats["val_conversations"] == 4


# --- PackedLoader ------------------------------------------------------------------------------

def packed_set(tmp_path, lengths, seed=0):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 1000, n) for n in lengths]
    masks = [(rng.random(n) < 0.5).astype(np.uint8) for n in lengths]
    data.write_documents(tmp_path / "train.bin", docs, masks, vocab_size=1000)
    return docs, masks


def test_packed_loader_rows(tmp_path):
    # Every row: whole documents (one longer than T cut to T) one after another, then padding; y the
    # next token of the same document where the mask marks it, else -1; cu_seqlens their offsets.
    lengths = [3, 17, 5, 1, 8, 40, 2, 9, 16, 4, 11]
    docs, masks = packed_set(tmp_path, lengths)
    T, B = 16, 3
    loader = data.PackedLoader(tmp_path / "train.bin", B, T, seed=3)
    seen = []
    for _ in range(6):  # past the end of the first epoch
        x, y, cu = loader.next_batch()
        assert x.shape == y.shape == (B, T) and cu.dtype == torch.int32
        offsets = cu.tolist()
        assert offsets[0] == 0 and offsets[-1] == B * T and all(r * T in offsets for r in range(B))
        targets, documents = 0, []
        for start, end in zip(offsets, offsets[1:]):
            row_x, row_y = x.view(-1)[start:end].numpy(), y.view(-1)[start:end].numpy()
            match = [d for d in range(len(docs)) if len(row_x) == min(len(docs[d]), T)
                     and (docs[d][:len(row_x)] == row_x).all()]
            if not match:  # padding, always last in its row
                assert (end % T == 0) and (row_y == -1).all() and (row_x == 0).all()
                continue
            d = match[0]
            seen.append(d)
            documents.append(end - start)
            n = len(row_x)
            nxt = np.append(docs[d][1:n + 1], -1)[:n] if n == len(docs[d]) else docs[d][1:n + 1]
            want = np.where(np.append(masks[d][1:n + 1], 0)[:n] == 1, nxt, -1)
            assert (row_y == want).all()
            targets += int((want != -1).sum())
        assert loader.targets == loader.global_targets == targets
        assert loader.lengths == documents and sum(documents) == B * T - loader.padding  # for the FLOPs count
    assert sorted(seen[:len(docs)]) == list(range(len(docs)))  # each document once in the first epoch


def test_packed_loader_window_fills_rows(tmp_path):
    # Long-tailed lengths: first-fit over a window of waiting documents leaves less padding than
    # taking them strictly in order (lookahead=1), and both place every document once per epoch.
    rng = np.random.default_rng(2)
    lengths = np.clip(rng.lognormal(np.log(50), 0.8, 300).astype(int), 4, 256)
    packed_set(tmp_path, lengths.tolist())
    padding = {}
    for lookahead in (1, 64):
        loader = data.PackedLoader(tmp_path / "train.bin", 4, 256, seed=0, lookahead=lookahead)
        positions = pad = 0
        while loader.epoch == 0:
            loader.next_batch()
            positions, pad = positions + 4 * 256, pad + loader.padding
        padding[lookahead] = pad / positions
    assert padding[64] < padding[1] / 3


def test_packed_loader_ranks_and_resume(tmp_path):
    packed_set(tmp_path, [random.Random(i).randint(1, 20) for i in range(50)])
    path = tmp_path / "train.bin"
    whole = data.PackedLoader(path, 4, 16, seed=1)
    halves = [data.PackedLoader(path, 2, 16, seed=1, rank=r, world_size=2) for r in range(2)]
    for _ in range(5):
        x, y, cu = whole.next_batch()
        parts = [h.next_batch() for h in halves]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)
        assert torch.equal(torch.cat([parts[0][2][:-1], parts[1][2] + 32]), cu)
        assert halves[0].global_targets == whole.global_targets == halves[0].targets + halves[1].targets
    state = whole.state_dict()
    after = [whole.next_batch() for _ in range(8)]
    again = data.PackedLoader(path, 4, 16, seed=1)
    again.load_state_dict(state)
    for want in after:
        assert all(torch.equal(a, b) for a, b in zip(again.next_batch(), want))


def test_packed_loader_checks_its_files(tmp_path):
    packed_set(tmp_path, [4, 5, 6])
    np.save(tmp_path / "train.docs.npy", np.array([0, 4, 9, 14]))
    with pytest.raises(data.TokenFileError, match="prepare the data again"):
        data.PackedLoader(tmp_path / "train.bin", 2, 8)


# --- pyllm train on conversations ---------------------------------------------------------------

@pytest.fixture(scope="module")
def chat_run_inputs(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    folder = make_folder(root / "hf", PLAIN, model=True)
    rng = random.Random(0)
    convs = []
    for _ in range(120):
        a, b = rng.randrange(100), rng.randrange(100)
        convs.append([{"role": "user", "content": f"what is {a} plus {b}?"}, {"role": "assistant", "content": f"{a + b}"}])
    return folder, write_jsonl(root / "chats.jsonl", convs)


def train_args(folder, chats, out, *extra):
    return ["train", "--init-from-hf", str(folder), "--data", str(chats), "--out", str(out), "--lr", "1e-3",
            "--warmup-steps", "2", "--seq-len", "48", "--eval-every", "0", "--eval-batches", "2", "--device", "cpu",
            "--sample-tokens", "0", "--seed", "5", *extra]


def logged(run):
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def test_train_on_conversations_resumes_exactly(chat_run_inputs, tmp_path, capsys):
    folder, chats = chat_run_inputs
    assert cli.main(train_args(folder, chats, tmp_path / "a", "--max-steps", "6", "--batch-size", "4")) == 0
    out = capsys.readouterr().out
    assert "120 conversations -> " in out and "the assistant's, trained on" in out
    assert json.loads((tmp_path / "a" / "run.json").read_text())["chat"] is True
    assert (tmp_path / "a" / "data" / "train.rows.jsonl").exists()  # (a later GRPO run may take these files)
    assert cli.main(train_args(folder, chats, tmp_path / "short", "--max-steps", "1", "--batch-size", "2",
                               "--seq-len", "8")) == 0
    assert "conversations are longer than seq_len 8" in capsys.readouterr().err
    assert cli.main(train_args(folder, chats, tmp_path / "b", "--max-steps", "3", "--batch-size", "4")) == 0
    assert cli.main(["train", "--resume", str(tmp_path / "b"), "--max-steps", "6"]) == 0
    assert [r["loss"] for r in logged(tmp_path / "a")] == [r["loss"] for r in logged(tmp_path / "b")]
    losses = [r["loss"] for r in logged(tmp_path / "a")]
    assert losses[-1] < losses[0] and logged(tmp_path / "a")[-1]["val_loss"] is not None


def test_train_on_conversations_weighs_tokens_across_micro_batches(chat_run_inputs, tmp_path):
    # 2 micro-batches of 2 rows are the batch of 4 rows (the same rows: the loader packs them in
    # one order), so the step's loss is the mean over all its trained tokens either way, not the
    # mean of the two micro-batches' means; and so the weights after the step.
    from pyllm.model import LLM

    folder, chats = chat_run_inputs
    assert cli.main(train_args(folder, chats, tmp_path / "one", "--max-steps", "2", "--batch-size", "4")) == 0
    assert cli.main(train_args(folder, chats, tmp_path / "two", "--max-steps", "2", "--batch-size", "2",
                               "--grad-accum", "2")) == 0
    one, two = logged(tmp_path / "one"), logged(tmp_path / "two")
    for a, b in zip(one, two):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    w1 = LLM.load(tmp_path / "one" / "model.safetensors").state_dict()
    w2 = LLM.load(tmp_path / "two" / "model.safetensors").state_dict()
    # AdamW's first steps move every weight by ~lr (1e-3) whatever its gradient's size, so an element
    # whose gradient is near zero carries the two summation orders' rounding up to lr: one of 4,096
    # moved 2.1e-5 apart in a clean-clone CI run (2026-12-03, head dim 16 on the padded kernels). The
    # weighting itself is the loss and grad-norm check above; here all but a few weights of the model
    # within 1e-5.
    apart = torch.cat([(w1[k] - w2[k]).abs().flatten() for k in w1])  # every weight of the model
    assert apart.isfinite().all() and (apart > 1e-5).sum() <= max(1, 1e-3 * apart.numel())


def test_fine_tune_a_fine_tuned_run(chat_run_inputs, tmp_path, capsys):
    # A run fine-tuned from a Hugging Face model passes it on to --init-from-run: its chat template
    # for messages, its markers, its config for `pyllm export`, the sample as a reply.
    folder, chats = chat_run_inputs
    assert cli.main(train_args(folder, chats, tmp_path / "a", "--max-steps", "1", "--batch-size", "4")) == 0
    args = train_args(folder, chats, tmp_path / "b", "--max-steps", "1", "--batch-size", "4")
    args[args.index("--init-from-hf"):args.index("--init-from-hf") + 2] = ["--init-from-run", str(tmp_path / "a")]
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "the assistant's, trained on" in capsys.readouterr().out
    run = json.loads((tmp_path / "b" / "run.json").read_text())
    assert run["chat"] is True and run["init_from_hf"] == str(folder)
    assert np.array_equal(np.load(tmp_path / "a" / "data" / "train.mask.npy"), np.load(tmp_path / "b" / "data" / "train.mask.npy"))


@pytest.mark.parametrize("options,modules", [
    ((), ["down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"]),
    (("--lora-targets", "q_proj,v,down", "--lora-dropout", "0.1"), ["down_proj", "q_proj", "v_proj"]),
], ids=["fused", "targets"])
def test_lora_run_exports_a_peft_adapter(chat_run_inputs, tmp_path, options, modules):
    # `pyllm export --adapter`: the updates alone, in PEFT's names over the source model; the
    # source's weights plus them are the merged export's (and, with peft, PeftModel computes what the
    # merged model does). Fused updates split into q, k, v (gate, up) with one A; --lora-targets
    # runs (each projection its own update, as PEFT trains them) give exactly those modules, and
    # their dropout goes into the config.
    from safetensors.torch import load_file

    folder, chats = chat_run_inputs
    run = tmp_path / "r"
    assert cli.main(train_args(folder, chats, run, "--max-steps", "2", "--batch-size", "4", "--lora-rank", "4",
                               "--lr", "3e-2", *options)) == 0
    # (the adapter fp32 by default, as PEFT's save_pretrained keeps it; it had been rounded to bf16)
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "adapter"), "--adapter"]) == 0
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["lora_alpha"] == 8 and config["base_model_name_or_path"] == str(folder)
    assert config["target_modules"] == modules and config["lora_dropout"] == (0.1 if options else 0.0)
    adapter = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    base, merged = load_file(str(folder / "model.safetensors")), load_file(str(tmp_path / "merged" / "model.safetensors"))
    updated = 0
    for name, w in base.items():
        key = "base_model.model." + name.removesuffix(".weight")
        if key + ".lora_A.weight" in adapter:
            a, b = adapter[key + ".lora_A.weight"].double(), adapter[key + ".lora_B.weight"].double()
            assert a.shape[0] == b.shape[1] == 4 and b.abs().max() > 0, name
            torch.testing.assert_close(merged[name].double(), w.double() + 2.0 * b @ a, rtol=1e-6, atol=1e-7)
            updated += 1
        else:
            assert torch.equal(merged[name], w), name
    assert updated == len(modules) * 2 and len(adapter) == 2 * updated  # 2 layers
    assert {t.dtype for t in adapter.values()} == {torch.float32}
    try:
        import peft
    except ImportError:
        return
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(folder),
                                            tmp_path / "adapter").eval()
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    idx = torch.randint(0, full.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, full(idx).logits, rtol=1e-5, atol=1e-5)


def test_steps_and_evaluations_with_nothing_to_train_on(chat_run_inputs, tmp_path, capsys):
    # Conversations whose replies --seq-len cuts away entirely (an audit of accumulation, 2026-12-05):
    # such a step had logged loss 0.0 and stepped (AdamW's momentum and weight decay moving the
    # weights), such an evaluation val loss 0.0, which --keep-best then kept as the best
    folder, chats = chat_run_inputs
    run = tmp_path / "r"
    assert cli.main(train_args(folder, chats, run, "--max-steps", "2", "--batch-size", "2", "--seq-len", "8",
                               "--eval-every", "1", "--keep-best", "--weight-decay", "0.1")) == 0
    log = logged(run)
    assert [(r["loss"], r["skipped"], r["val_loss"]) for r in log] == [(None, True, None)] * 2
    out = capsys.readouterr()
    assert "val loss nan (no trained token in the val batches" in out.out + out.err
    assert "2 steps had no trained token" in out.err and "non-finite gradients" not in out.err
    from pyllm.model import LLM

    before, after = LLM.from_hf(folder).state_dict(), LLM.load(run / "model.safetensors").state_dict()
    assert all(torch.equal(before[k], after[k].to(before[k].dtype)) for k in before)  # (nothing stepped)


def test_exports_take_the_weights_the_run_means(chat_run_inputs, tmp_path, capsys, monkeypatch):
    # From an audit of `pyllm export` (2026-12-05): a relative --init-from-hf is recorded absolute
    # (an export from elsewhere had read another folder of that name); --keep-best's adapter would be
    # the last step's while the merged export is the best's: refused; a run stopped after its
    # model.safetensors was written exports its checkpoint's weights; --out must be new or empty.
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    folder, chats = chat_run_inputs
    monkeypatch.chdir(folder.parent)
    run = tmp_path / "r"
    args = train_args(folder.name, chats, run, "--max-steps", "2", "--batch-size", "4", "--lora-rank", "4",
                      "--keep-best", "--eval-every", "1")
    assert cli.main(args) == 0
    monkeypatch.chdir(tmp_path)
    assert json.loads((run / "run.json").read_text())["init_from_hf"] == str(folder)
    weights = run / "model.safetensors"
    with safe_open(str(weights), "pt") as f:
        meta = f.metadata()
    state = load_file(str(weights))
    if meta["pyllm_step"] == "2":  # (the last step was the best: as if the first had been)
        save_file(state, str(weights), metadata={**meta, "pyllm_step": "1"})
    capsys.readouterr()
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "adapter"), "--adapter"]) == 2
    assert "its adapter is the last step's (2): export it without --adapter" in capsys.readouterr().err
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "merged" / "config.json").read_text())  # (the source's, found from here)
    assert config["model_type"] == json.loads((folder / "config.json").read_text())["model_type"]
    # stopped after model.safetensors: the checkpoint's weights (step 2), with a notice
    save_file(state, str(weights), metadata={**meta, "pyllm_step": "1"})
    checkpoint = torch.load(run / "checkpoint.pt", weights_only=True)
    checkpoint["train_config"]["keep_best"] = False
    torch.save(checkpoint, run / "checkpoint.pt")
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 2
    assert "is not empty (config.json, generation_config.json, model.safetensors" in capsys.readouterr().err
    (tmp_path / "merged" / "adapter_config.json").write_text("{}")  # a stale adapter: would be applied on top
    (tmp_path / "merged" / "notes.txt").write_text("mine")
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32", "--force"]) == 0
    assert "stopped at step 2, after its model.safetensors (step 1) was written" in capsys.readouterr().err
    assert not (tmp_path / "merged" / "adapter_config.json").exists() and (tmp_path / "merged" / "notes.txt").exists()
    (run / "model.safetensors").unlink()  # stopped before its end: the checkpoint's
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "m2"), "--dtype", "fp32"]) == 0
    assert "before its end" in capsys.readouterr().err
    first, second = load_file(str(tmp_path / "merged" / "model.safetensors")), load_file(str(tmp_path / "m2" / "model.safetensors"))
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    assert any(not torch.equal(first[k], v) for k, v in load_file(str(folder / "model.safetensors")).items())
    assert cli.main(["export", "--run", str(folder), "--out", str(tmp_path / "m3")]) == 2
    assert "is a Hugging Face checkpoint folder already" in capsys.readouterr().err


@pytest.mark.parametrize("lora", [(), ("--lora-rank", "4"), ("--lora-rank", "4", "--lora-targets", "q,v,experts")],
                         ids=["full", "lora", "lora-experts"])
def test_mixture_of_experts_checkpoint_fine_tunes_and_exports(chat_run_inputs, tmp_path, lora):
    # A Mixtral checkpoint fine-tuned on conversations (all its weights, LoRA on its attention, or
    # LoRA on q, v and every expert); the export is a Mixtral transformers loads and computes as
    # pyllm does; a LoRA run's adapter is PEFT's (attention modules, and the experts as
    # target_parameters), which PeftModel adds to the source as the merged export.
    from pyllm.model import LLM

    _, chats = chat_run_inputs
    folder = make_folder(tmp_path / "hf", PLAIN, model="mixtral")
    run = tmp_path / "run"
    assert cli.main(train_args(folder, chats, run, "--max-steps", "2", "--batch-size", "4", "--lr", "3e-2", *lora)) == 0
    records = logged(run)
    assert "aux_loss" not in records[0]  # transformers' config asks for no router logits: no balancing term
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "merged"), "--dtype", "fp32"]) == 0
    ours = LLM.from_hf(tmp_path / "merged").eval()
    assert ours.config.n_experts == 4
    full = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    source = transformers.AutoModelForCausalLM.from_pretrained(folder).eval()
    idx = torch.randint(0, full.config.vocab_size, (2, 11))
    with torch.no_grad():
        torch.testing.assert_close(full(idx).logits, ours(idx)[0], rtol=1e-4, atol=1e-4)
        assert not torch.allclose(full(idx).logits, source(idx).logits, atol=1e-3)  # it was trained
    if not lora:
        return
    assert cli.main(["export", "--run", str(run), "--out", str(tmp_path / "adapter"), "--adapter", "--dtype", "fp32"]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    if "--lora-targets" in lora:
        assert config["target_modules"] == ["q_proj", "v_proj"]
        assert config["target_parameters"] == ["experts.down_proj", "experts.gate_up_proj"]
    else:
        assert config["target_modules"] == ["k_proj", "o_proj", "q_proj", "v_proj"] and "target_parameters" not in config
    peft = pytest.importorskip("peft")
    theirs = peft.PeftModel.from_pretrained(source, tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, full(idx).logits, rtol=1e-5, atol=1e-5)


def test_distill_from_a_hugging_face_teacher(chat_run_inputs, tmp_path):
    # `pyllm train --teacher DIR`: the source model as its own teacher gives a divergence of 0 at the
    # first step (the same distributions); with --distill-alpha 0.5 half the plain run's cross-entropy.
    folder, chats = chat_run_inputs
    common = ("--max-steps", "1", "--batch-size", "4")
    assert cli.main(train_args(folder, chats, tmp_path / "kd", *common, "--teacher", str(folder),
                               "--distill-beta", "0.5", "--distill-temperature", "2")) == 0
    assert abs(logged(tmp_path / "kd")[0]["loss"]) < 1e-6
    assert cli.main(train_args(folder, chats, tmp_path / "half", *common, "--teacher", str(folder),
                               "--distill-alpha", "0.5")) == 0
    assert cli.main(train_args(folder, chats, tmp_path / "plain", *common)) == 0
    assert logged(tmp_path / "half")[0]["loss"] == pytest.approx(0.5 * logged(tmp_path / "plain")[0]["loss"], rel=1e-5)
    # on-policy (--distill-lmbda 1): the student's samples, ending at the checkpoint's end-of-sequence ids
    from pyllm.tokenizer.tokenizer import hf_stop_ids

    assert cli.main(train_args(folder, chats, tmp_path / "gkd", *common, "--teacher", str(folder), "--distill-lmbda", "1",
                               "--distill-max-new-tokens", "4")) == 0
    assert logged(tmp_path / "gkd")[0]["on_policy"] == 1.0 and abs(logged(tmp_path / "gkd")[0]["loss"]) < 1e-6
    saved = torch.load(tmp_path / "gkd" / "checkpoint.pt", weights_only=False)["train_config"]
    assert saved["sample_stop_tokens"] == hf_stop_ids(folder) != []
    assert cli.main(train_args(folder, chats, tmp_path / "seq", *common, "--teacher", str(folder), "--distill-seq-kd",
                               "--distill-max-new-tokens", "4")) == 0  # the teacher's samples
    assert abs(logged(tmp_path / "seq")[0]["loss"]) < 1e-6


def test_chat_template_given_renders_the_training_conversations(tmp_path, capsys):
    # Qwen3's template drops earlier turns' reasoning (refused: the replies cannot be found by
    # rendering prefixes; the message names TRL's training variant where trl is installed);
    # --chat-template FILE renders the conversations with another (TRL's chat_template_path), here
    # TRL's qwen3_training.jinja ({% generation %} marks, every turn's reasoning kept): the ids and
    # mask transformers' return_assistant_tokens_mask gives with it. The folder's own template stays
    # the model's (generation, export).
    trl = pytest.importorskip("trl")
    from pathlib import Path

    from pyllm.tokenizer.tokenizer import hf_chat_tokens

    templates = Path(trl.__file__).parent / "chat_templates"
    if not (templates / "qwen3_training.jinja").is_file():
        pytest.skip("this TRL ships no qwen3_training.jinja")
    folder = make_folder(tmp_path / "hf", (templates / "qwen3.jinja").read_text(), model=True)
    rng = random.Random(1)
    convs = []
    for i in range(12):
        a, b = rng.randrange(100), rng.randrange(100)
        convs.append([{"role": "user", "content": f"what is {a} plus {b}?"},
                      {"role": "assistant", "content": f"{a + b}", "reasoning_content": f"{a} and {b} make {a + b}"},
                      {"role": "user", "content": "and times?"}, {"role": "assistant", "content": f"{a * b}"}])
    chats = write_jsonl(tmp_path / "chats.jsonl", convs)
    assert cli.main(train_args(folder, chats, tmp_path / "own", "--max-steps", "1", "--batch-size", "2")) == 2
    assert f"--chat-template {templates / 'qwen3_training.jinja'}" in capsys.readouterr().err
    run = tmp_path / "run"
    assert cli.main(train_args(folder, chats, run, "--max-steps", "1", "--batch-size", "2", "--chat-template",
                               str(templates / "qwen3_training.jinja"))) == 0
    training = (templates / "qwen3_training.jinja").read_text()
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    ours = Tokenizer.from_hf(folder / "tokenizer.json")
    for messages in convs[:3]:
        out = hf_tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, chat_template=training,
                                               return_assistant_tokens_mask=True)
        assert hf_chat_tokens(run / "chat_template", ours, messages) == (list(out["input_ids"]),
                                                                          list(out["assistant_masks"]))
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] != training
    # given where it would be left unread: refused (from the review)
    assert cli.main(train_args(folder, chats, tmp_path / "y", "--tokenizer", str(run / "tokenizer.bpe"),
                               "--chat-template", str(templates / "qwen3_training.jinja"))) == 2
    assert "this run's tokenizer is --tokenizer's" in capsys.readouterr().err
    (tmp_path / "none.txt").write_text("plain text to continue pretraining on\n" * 50)
    assert cli.main(train_args(folder, tmp_path / "none.txt", tmp_path / "x", "--chat-template",
                               str(templates / "qwen3_training.jinja"))) == 2
    assert "--data holds none" in capsys.readouterr().err


def test_token_files_are_made_again_when_a_template_they_were_rendered_with_changes(tmp_path, capsys):
    # save_pretrained's additional_chat_templates/tool_use.jinja renders the rows with tools, and
    # special_tokens_map.json gives older folders' bos / eos: an edit of either had reused the token
    # files made with the old text ("data: reusing"; from the tool-calling audit)
    folder = make_folder(tmp_path / "hf", PLAIN, model=True)
    (folder / "additional_chat_templates").mkdir()
    tool_use = folder / "additional_chat_templates" / "tool_use.jinja"
    tool_use.write_text("{{ 'TOOLS ' + (tools | tojson) + '\\n' }}" + PLAIN)
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object", "properties": {}}}}]
    rows = tmp_path / "tools.jsonl"
    talks = [[{"role": "user", "content": f"what is {i} plus 1?"}, {"role": "assistant", "content": f"{i + 1}"}]
             for i in range(20)]
    rows.write_text("".join(json.dumps({"messages": talk, "tools": tools}) + "\n" for talk in talks))
    args = train_args(folder, rows, tmp_path / "run", "--max-steps", "1", "--batch-size", "2", "--seq-len", "96")
    assert cli.main(args) == 0
    assert cli.main(args) == 0 and "data: reusing" in capsys.readouterr().out
    tool_use.write_text("{{ 'OTHER ' + (tools | tojson) + '\\n' }}" + PLAIN)
    assert cli.main(args) == 0 and "data: reusing" not in capsys.readouterr().out
    ids = data.open_tokens(tmp_path / "run" / "data" / "train.bin")
    assert Tokenizer.from_hf(folder / "tokenizer.json").decode(list(ids[:40])).startswith("OTHER ")
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<|endoftext|>"}))
    assert cli.main(args) == 0 and "data: reusing" not in capsys.readouterr().out


def test_a_row_its_chat_template_fails_on_is_named(tmp_path):
    # a template's raise_exception (Mistral's roles must alternate) or an undefined field had been
    # reported without the line (a jinja2 UndefinedError escaped as a traceback; from the
    # tool-calling audit)
    folder = make_folder(tmp_path / "hf", "{% for m in messages %}{% if loop.index0 % 2 != (m.role == 'assistant') %}"
                         "{{ raise_exception('roles must alternate') }}{% endif %}{{ m.role }}: {{ m.content }}"
                         "{% if m.role == 'assistant' %}{{ m.tool_calls[0].function.name }}{% endif %}\n{% endfor %}")
    tokenizer = Tokenizer.from_hf(folder / "tokenizer.json")
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "tool_calls": [
        {"type": "function", "function": {"name": "f", "arguments": {}}}]}]
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (good, [good[0], good[0], good[1]])))
    with pytest.raises(ValueError, match=r"c.jsonl:2: .*roles must alternate"):
        data.prepare_chat([path], tokenizer, folder, tmp_path / "out", show_progress=False)
    no_call = [good[0], {**good[1], "tool_calls": None}]
    path.write_text("".join(json.dumps({"messages": m}) + "\n" for m in (good, good, no_call)))
    with pytest.raises(ValueError, match=r"c.jsonl:3: the chat template failed \(UndefinedError\)"):
        data.prepare_chat([path], tokenizer, folder, tmp_path / "out", show_progress=False)


def reward_model_of(folder, tokenizer, path):
    """A reward model (a random score head, pad <|endoftext|>) on folder's model, saved to path, in eval mode."""
    from pyllm.model import LLM

    torch.manual_seed(0)
    rm = LLM.from_hf(folder)
    rm.add_score_head()
    rm.config.pad_token_id = tokenizer.special_tokens["<|endoftext|>"]
    rm.to_hf(path)
    return rm.eval()


def test_grpo_reward_model_reads_a_reply_framed_as_the_template_frames_it(chat_run_inputs, tmp_path):
    # A reward model trained on conversations saw each reply end as the chat template ends it (ChatML:
    # "<|im_end|>\n", read at the "\n", its pad <|endoftext|>); GRPO's samples stop at <|im_end|> (or
    # are cut): each is scored with the template's ending, as TRL's GRPOTrainer renders the
    # conversation for its reward model (it had been read at <|im_end|>: +2.11 where the model's
    # training read -3.02; from the reward-model audit). Text prompts (no generation prompt) as sampled.
    from pyllm import train as trainer
    from pyllm.tokenizer.tokenizer import hf_chat_prompt, hf_reply_framing
    from pyllm.train import TrainConfig

    folder, _ = chat_run_inputs
    tokenizer = Tokenizer.from_hf(folder / "tokenizer.json")
    end, newline = tokenizer.special_tokens["<|im_end|>"], tokenizer.encode("\n")
    opening, closing = hf_reply_framing(folder, tokenizer)
    assert tokenizer.decode(opening) == "<|im_start|>assistant\n" and closing == [end, *newline]
    rm = reward_model_of(folder, tokenizer, tmp_path / "rm")
    user = [{"role": "user", "content": "what is 2 plus 3?"}]
    prompt = tokenizer.encode(hf_chat_prompt(folder, user), allowed_special="all")
    text_prompt = tokenizer.encode("what is 2 plus 3?")
    reply = tokenizer.encode("5")
    cfg = TrainConfig(grpo_reward=str(tmp_path / "rm"), init_from_hf=str(folder), sample_stop_tokens=[end])
    (reward,) = trainer.load_reward(cfg, rm, "fp32", torch.device("cpu"), tokenizer)
    prompts, samples = [prompt, prompt, text_prompt], [reply + [end], reply, reply + [end]]
    got = reward(prompts, samples, trainer.pack_replies(prompts, samples, 48, "cpu"), None)
    trained = tokenizer.encode(hf_chat_prompt(folder, user + [{"role": "assistant", "content": "5"}],
                                              add_generation_prompt=False), allowed_special="all")
    assert trained == prompt + reply + closing
    with torch.no_grad():
        want = [rm(torch.tensor([ids]), scores=True)[1][0, 0].item() for ids in (trained, trained, text_prompt + reply + [end])]
    np.testing.assert_allclose(got.tolist(), want, rtol=1e-5)


def test_grpo_reward_model_reads_a_sample_rendered_again_where_framing_fails(tmp_path, capsys):
    # Qwen3's template puts an empty think block between its generation prompt and a reply where none
    # was given, so no prompt + reply + ending describes how a reward model trained on its
    # conversations saw a reply: the sample is decoded and the conversation rendered again, as TRL's
    # GRPOTrainer does for its reward model (apply_chat_template of prompt + completion, its text
    # tokenized again; with the row's chat_template_kwargs, as pyllm renders the row's prompt, where
    # TRL 1.16 takes GRPOConfig's for every row); samples had been scored as sampled, a think block
    # the model had not seen.
    trl = pytest.importorskip("trl")
    from pathlib import Path

    from trl.data_utils import apply_chat_template

    from pyllm import train as trainer
    from pyllm.tokenizer.tokenizer import hf_reply_framing
    from pyllm.train import TrainConfig

    template = Path(trl.__file__).parent / "chat_templates" / "qwen3.jinja"
    if not template.is_file():
        pytest.skip("this TRL ships no qwen3.jinja")
    folder = make_folder(tmp_path / "hf", template.read_text(), model=True)
    tokenizer = Tokenizer.from_hf(folder / "tokenizer.json")
    end = tokenizer.special_tokens["<|im_end|>"]
    assert hf_reply_framing(folder, tokenizer) == ([], [])
    rm = reward_model_of(folder, tokenizer, tmp_path / "rm")
    user = [{"role": "user", "content": "what is 2 plus 3?"}]
    rows = [{"prompt": user}, {"prompt": user}, {"prompt": user, "chat_template_kwargs": {"enable_thinking": False}},
            {"prompt": "what is 2 plus 3?"}]
    prompt = tokenizer.encode(hf_chat_prompt(folder, user), allowed_special="all")
    text_prompt = tokenizer.encode("what is 2 plus 3?")
    prompts = [prompt, prompt, prompt, text_prompt]
    samples = [tokenizer.encode("<think>\ntwo and three\n</think>\n\n5") + [end], tokenizer.encode("5"),
               tokenizer.encode("5") + [end, tokenizer.special_tokens["<|endoftext|>"]], tokenizer.encode("5") + [end]]
    cfg = TrainConfig(grpo_reward=str(tmp_path / "rm"), init_from_hf=str(folder), sample_stop_tokens=[end])
    (reward,) = trainer.load_reward(cfg, rm, "fp32", torch.device("cpu"), tokenizer)
    packed = trainer.pack_replies(prompts, samples, 96, "cpu")
    got = reward(prompts[:3], samples[:3], trainer.pack_replies(prompts[:3], samples[:3], 96, "cpu"), rows[:3])
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    texts = hf_tokenizer.batch_decode([s[:-1] if s[-1] == end else s for s in samples[:3]], skip_special_tokens=True)
    trl_ids = [hf_tokenizer(apply_chat_template({"messages": row["prompt"] + [{"role": "assistant", "content": text}]},
                                                hf_tokenizer, **row.get("chat_template_kwargs", {}))["text"],
                            add_special_tokens=False)["input_ids"] for row, text in zip(rows, texts)]
    assert tokenizer.decode(trl_ids[0]).count("<think>") == 1 and "<think>\n\n</think>" in tokenizer.decode(trl_ids[1])
    with torch.no_grad():
        want = [rm(torch.tensor([ids]), scores=True)[1][0, 0].item() for ids in trl_ids]
        sampled = [rm(torch.tensor([p + s]), scores=True)[1][0, 0].item() for p, s in zip(prompts, samples)]
    np.testing.assert_allclose(got.tolist(), want, rtol=1e-5)
    assert abs(got[1].item() - sampled[1]) > 1e-3  # (the empty think block: another sequence than as sampled)
    # rows of text prompts (and no rows at all) are scored as sampled, saying so once
    capsys.readouterr()
    np.testing.assert_allclose(reward(prompts, samples, packed, None).tolist(), sampled, rtol=1e-5)
    assert "scored as sampled, not rendered again" in capsys.readouterr().err
    packed_text = trainer.pack_replies(prompts[3:], samples[3:], 96, "cpu")
    np.testing.assert_allclose(reward(prompts[3:], samples[3:], packed_text, rows[3:]).tolist(), sampled[3:], rtol=1e-5)


@pytest.mark.parametrize("extra, message", [(("--grpo-off-policy-mask", "0"), "a finite number > 0"),
                                            (("--grpo-sapo-temperatures", "1", "1.05"), "goes with grpo_loss_type sapo"),
                                            (("--grpo-vespo", "2", "3", "3", "2"), "goes with grpo_loss_type vespo")])
def test_grpo_options_that_would_do_nothing_are_refused(chat_run_inputs, tmp_path, capsys, extra, message):
    # --grpo-off-policy-mask 0 is TRL's threshold 0.0 (a mask), not pyllm's off; sapo's and vespo's
    # parameters, at their defaults too, with another loss type change nothing (from an audit)
    folder, chats = chat_run_inputs
    try:  # (argparse's type errors exit; the trainer's refusals return a code)
        code = cli.main(train_args(folder, chats, tmp_path / "r", "--max-steps", "1", "--batch-size", "2",
                                   "--grpo-reward", "test_grpo:sevens", "--grpo-generations", "2",
                                   "--grpo-max-new-tokens", "2", *extra))
    except SystemExit as e:
        code = e.code
    assert code != 0 and message in capsys.readouterr().err


def test_grpo_from_a_hugging_face_model(chat_run_inputs, tmp_path):
    # `pyllm train --grpo-reward module:function`: samples ending at the checkpoint's end-of-sequence
    # ids and its tokenizer's eos_token (TRL's GRPOTrainer's), rewarded by the function; the log has the rewards.
    from pyllm.tokenizer.tokenizer import hf_special_token_id, hf_stop_ids

    folder, chats = chat_run_inputs
    assert cli.main(train_args(folder, chats, tmp_path / "rl", "--max-steps", "2", "--batch-size", "2",
                               "--grpo-reward", "test_grpo:sevens", "--grpo-generations", "2",
                               "--grpo-max-new-tokens", "4", "--grpo-iterations", "2", "--grpo-epsilon-high", "0.28",
                               "--grpo-scale-rewards", "batch", "--grpo-loss-type", "bnpo",
                               "--grpo-importance-sampling", "sequence", "--grpo-mask-truncated",
                               "--grpo-log-completions", "2")) == 0
    written = [json.loads(line) for line in (tmp_path / "rl" / "completions.jsonl").read_text().splitlines()]
    assert len(written) == 2 and all(isinstance(r["prompt"], str) and isinstance(r["completion"], str) for r in written)
    first, record = logged(tmp_path / "rl")  # (one generation, its metrics logged at its step, TRL's)
    assert "clip_ratio/region_mean" in record and "reward" not in record and "entropy" in record
    record = first
    assert {"reward", "reward_std", "completions/mean_length"} <= record.keys()
    assert 1 <= record["completions/mean_length"] <= 4
    saved = torch.load(tmp_path / "rl" / "checkpoint.pt", weights_only=False)["train_config"]
    stops = set(hf_stop_ids(folder)) | {hf_special_token_id(folder, "eos_token")} - {None}
    assert set(saved["sample_stop_tokens"]) == stops and saved["grpo_generations"] == 2
    # a generation_config.json naming another end: GRPO's samples stop at the tokenizer's eos_token too
    # (they had run past it, rewarded and trained so; from the GRPO audit)
    other = tmp_path / "other"
    shutil.copytree(folder, other)
    (other / "generation_config.json").write_text(json.dumps({"eos_token_id": 5}))
    assert cli.main(train_args(other, chats, tmp_path / "rl-other", "--max-steps", "1", "--batch-size", "2",
                               "--grpo-reward", "test_grpo:sevens", "--grpo-generations", "2",
                               "--grpo-max-new-tokens", "2", "--grpo-steps-per-generation", "2", "--grpo-top-p", "0.9",
                               "--grpo-top-k", "20", "--grpo-delta", "1.5", "--grpo-off-policy-mask", "0.1",
                               "--grpo-min-p", "0.05", "--grpo-repetition-penalty", "1.1")) == 0
    other_saved = torch.load(tmp_path / "rl-other" / "checkpoint.pt", weights_only=False)["train_config"]
    assert sorted(other_saved["sample_stop_tokens"]) == sorted({5, hf_special_token_id(folder, "eos_token")})
    assert (other_saved["grpo_steps_per_generation"], other_saved["grpo_top_p"], other_saved["grpo_top_k"],
            other_saved["grpo_delta"], other_saved["grpo_off_policy_mask"], other_saved["grpo_min_p"],
            other_saved["grpo_repetition_penalty"]) == (2, 0.9, 20, 1.5, 0.1, 0.05, 1.1)
    assert (saved["grpo_iterations"], saved["grpo_epsilon_high"], saved["grpo_scale_rewards"], saved["grpo_loss_type"]) \
        == (2, 0.28, "batch", "bnpo") and saved["grpo_importance_sampling"] == "sequence" and saved["grpo_mask_truncated"]
    # prompts alone (TRL's prompt-only format), as messages and as text: each conversation's prompt
    # is everything before the empty reply the samples replace; the lines' other keys reach the
    # reward functions (TRL's: prompts as written, completions decoded, columns as lists), two
    # rewards summed by weight, each one's mean logged
    from pyllm import data
    from pyllm.tokenizer.tokenizer import Tokenizer, hf_chat_prompt

    import test_grpo

    rng = random.Random(4)
    for kind in ("messages", "text"):
        path = tmp_path / f"prompts-{kind}.jsonl"
        questions = [f"what is {rng.randrange(50)} plus {rng.randrange(50)}?" for _ in range(40)]
        with open(path, "w") as f:
            for i, q in enumerate(questions):
                prompt = [{"role": "user", "content": q}] if kind == "messages" else q
                f.write(json.dumps({"prompt": prompt, "answer": "ab"[i % 2], "id": i}) + "\n")
        assert cli.main(train_args(folder, path, tmp_path / f"p-{kind}", "--max-steps", "1", "--batch-size", "2")) == 2
        run = tmp_path / f"g-{kind}"
        test_grpo.CALLS.clear()
        assert cli.main(train_args(folder, path, run, "--max-steps", "1", "--batch-size", "2", "--grpo-reward",
                                   "test_grpo:sevens,test_grpo:answered", "--grpo-reward-weights", "0.5", "2",
                                   "--grpo-generations", "2", "--grpo-max-new-tokens", "3")) == 0
        assert (run / "data" / "train.rows.jsonl").exists()
        call = test_grpo.CALLS[0]  # the step's; then the val prompts' (the eval: val_reward)
        assert len(test_grpo.CALLS) == 3
        lines = [json.loads(line) for line in path.read_text().splitlines()]
        assert len(call["id"]) % 2 == 0 and len(call["id"]) >= 2 and call["id"][0::2] == call["id"][1::2]
        assert call["prompts"] == [lines[i]["prompt"] for i in call["id"]]
        assert call["answer"] == [lines[i]["answer"] for i in call["id"]]
        tokenizer = Tokenizer.load(json.loads((run / "run.json").read_text())["tokenizer"])
        texts = [tokenizer.decode([t for t in (ids[:-1] if ids[-1] in stops else ids) if t not in tokenizer.special_ids()])
                 for ids in call["completion_ids"]]  # (TRL's skip_special_tokens)
        assert call["completions"] == ([[{"role": "assistant", "content": t}] for t in texts] if kind == "messages" else texts)
        record = logged(run)[-1]
        assert {"rewards/sevens/mean", "rewards/answered/mean", "val_reward", "val_rewards/sevens/mean",
                "val_rewards/answered/mean"} <= record.keys()
        assert record["reward"] == pytest.approx(0.5 * record["rewards/sevens/mean"]
                                                 + 2 * record["rewards/answered/mean"])
        loader = data.PackedLoader(run / "data" / "train.bin", 1, 48, shuffle=False)
        batch = loader.next_batch()
        from pyllm import train as trainer

        prompt = trainer.last_reply_prompts(batch, 48)[0]
        if kind == "messages":  # the chat template's generation prompt
            assert prompt == tokenizer.encode(hf_chat_prompt(folder, [{"role": "user", "content": questions[0]}]),
                                              allowed_special="all")
        else:
            assert tokenizer.decode(prompt).endswith(questions[0])


def test_kto_on_unpaired_examples(chat_run_inputs, tmp_path, capsys):
    # `pyllm train --preference kto` on TRL's unpaired format (text and messages): each example
    # written with its KL example (its prompt, the previous example's completion in its split: TRL's rotation) as a
    # pair, the labels beside them; the first loss 0.5 (policy = reference), rewards logged.
    folder, _ = chat_run_inputs
    rng = random.Random(1)
    texts, messages = [], []
    for i in range(40):
        a, b = rng.randrange(100), rng.randrange(100)
        prompt, completion = f"what is {a} plus {b}?", f"{a + b if i % 2 == 0 else a * b}"
        texts.append({"prompt": prompt, "completion": completion, "label": i % 2 == 0})
        messages.append({"prompt": [{"role": "user", "content": prompt}],
                         "completion": [{"role": "assistant", "content": completion}], "label": i % 2 == 0})
    jsonl = lambda name, rows: (tmp_path / name).write_text("".join(json.dumps(r) + "\n" for r in rows)) and tmp_path / name  # noqa: E731
    mixed = jsonl("mixed.jsonl", texts[:3] + messages[3:6])
    with pytest.raises(ValueError, match="all text or all lists of messages"):
        data.prepare_kto([mixed], None, folder, tmp_path / "mixed")
    assert cli.main(train_args(folder, jsonl("chat.jsonl", messages), tmp_path / "chat", "--max-steps", "1",
                               "--batch-size", "4", "--preference", "kto")) == 0
    path = jsonl("kto.jsonl", texts)
    assert cli.main(train_args(folder, path, tmp_path / "run", "--max-steps", "2", "--batch-size", "4",
                               "--preference", "kto", "--beta", "0.2", "--desirable-weight", "1.3")) == 0
    assert "unpaired examples (20 desirable)" in capsys.readouterr().out
    data_dir = tmp_path / "run" / "data"
    labels = np.load(data_dir / "train.labels.npy")
    pairs, offsets = np.load(data_dir / "train.pairs.npy"), np.load(data_dir / "train.docs.npy")
    assert len(labels) == len(pairs) and labels.any() and not labels.all()
    tokens = data.open_tokens(data_dir / "train.bin")
    mask = np.load(data_dir / "train.mask.npy")
    doc = lambda d: np.asarray(tokens[offsets[d]:offsets[d + 1]])  # noqa: E731
    trained = lambda d: mask[offsets[d]:offsets[d + 1]].astype(bool)  # noqa: E731
    for u in range(len(pairs)):  # the KL document: this prompt, the previous example's completion
        nxt = (u - 1) % len(pairs)
        assert np.array_equal(doc(2 * u + 1)[~trained(2 * u + 1)], doc(2 * u)[~trained(2 * u)])
        assert np.array_equal(doc(2 * u + 1)[trained(2 * u + 1)], doc(2 * nxt)[trained(2 * nxt)])
    assert logged(tmp_path / "chat")[0]["loss"] == pytest.approx(0.5, abs=1e-6)  # weights 1: 1 - sigmoid(0)
    log = logged(tmp_path / "run")  # desirable ones weigh 1.3
    assert 0.5 < log[0]["loss"] <= 0.5 * 1.3 and "reward_accuracy" in log[0]


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_adapter_merges_into_from_hf(chat_run_inputs, tmp_path, capsys, rslora):
    # A LoRA adapter PEFT trained (here: drawn) on a Hugging Face model, merged into pyllm's copy of
    # it: the logits PeftModel gives. Refused where a weight update would not say it all.
    peft = pytest.importorskip("peft")
    from pyllm.model import LLM

    folder, _ = chat_run_inputs
    torch.manual_seed(0)
    base = transformers.AutoModelForCausalLM.from_pretrained(folder)
    theirs = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=12, target_modules="all-linear",
                                                       use_rslora=rslora)).eval()
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    theirs.save_pretrained(tmp_path / "adapter")
    ours = LLM.from_hf(folder, adapter=tmp_path / "adapter").eval()
    idx = torch.randint(0, base.config.vocab_size, (2, 9))
    with torch.no_grad():
        want = theirs(idx).logits
    assert not torch.allclose(want, LLM.from_hf(folder)(idx)[0].detach(), atol=1e-3)  # the adapter matters
    torch.testing.assert_close(ours(idx)[0].detach(), want, rtol=1e-5, atol=1e-5)
    assert cli.main(["generate", "--hf", str(folder), "--adapter", str(tmp_path / "adapter"), "--max-new-tokens", "3",
                     "--prompt", "what"]) == 0
    if not rslora:  # training goes on from the adapted model: its first loss is the adapted model's
        _, chats = chat_run_inputs
        assert cli.main(train_args(folder, chats, tmp_path / "r", "--max-steps", "1", "--batch-size", "4", "--lr", "1e-9",
                                   "--init-adapter", str(tmp_path / "adapter"))) == 0
        tuned = LLM.load(tmp_path / "r" / "model.safetensors").state_dict()
        for k, v in ours.state_dict().items():
            torch.testing.assert_close(tuned[k], v, rtol=0, atol=1e-6)
        # new LoRA updates over the merged adapter: as an adapter of their own they are another model
        assert cli.main(train_args(folder, chats, tmp_path / "r2", "--max-steps", "1", "--batch-size", "4",
                                   "--init-adapter", str(tmp_path / "adapter"), "--lora-rank", "2")) == 0
        capsys.readouterr()
        assert cli.main(["export", "--run", str(tmp_path / "r2"), "--out", str(tmp_path / "x2"), "--adapter"]) == 2
        assert "started from the adapter" in capsys.readouterr().err
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(NotImplementedError, match="use_dora"):
        LLM.from_hf(folder, adapter=tmp_path / "adapter")


def test_adapter_export_needs_a_lora_run_from_hf(chat_run_inputs, tmp_path, capsys):
    folder, chats = chat_run_inputs
    assert cli.main(train_args(folder, chats, tmp_path / "full", "--max-steps", "1", "--batch-size", "4")) == 0
    assert cli.main(["export", "--run", str(tmp_path / "full"), "--out", str(tmp_path / "x"), "--adapter"]) == 2
    assert "not a LoRA run" in capsys.readouterr().err
    # LoRA over another run's weights: an adapter over the Hugging Face source is another model (an
    # audit, 2026-12-06: PEFT's logits 0.11 off the merged export after 2 steps)
    assert cli.main(["train", "--init-from-run", str(tmp_path / "full"), "--data", str(chats), "--out",
                     str(tmp_path / "chained"), "--lora-rank", "2", "--max-steps", "1", "--batch-size", "4",
                     "--seq-len", "48", "--eval-every", "0", "--device", "cpu", "--sample-tokens", "0"]) == 0
    capsys.readouterr()
    assert cli.main(["export", "--run", str(tmp_path / "chained"), "--out", str(tmp_path / "x"), "--adapter"]) == 2
    assert "started from the weights of the run" in capsys.readouterr().err and not (tmp_path / "x").exists()
    assert cli.main(train_args(folder, chats, tmp_path / "lora", "--max-steps", "1", "--batch-size", "4",
                               "--lora-rank", "2")) == 0
    (tmp_path / "lora" / "checkpoint.pt").unlink()
    capsys.readouterr()
    assert cli.main(["export", "--run", str(tmp_path / "lora"), "--out", str(tmp_path / "x"), "--adapter"]) == 2
    assert "has no checkpoint.pt, which holds the LoRA updates unmerged" in capsys.readouterr().err


def test_conversations_need_a_chat_template(chat_run_inputs, tmp_path, capsys):
    _, chats = chat_run_inputs
    assert cli.main(["train", "--data", str(chats), "--out", str(tmp_path / "r"), "--max-steps", "1", "--device", "cpu"]) == 2
    assert "needs --init-from-hf" in capsys.readouterr().err


# --- preference pairs (DPO) ---------------------------------------------------------------------

def test_read_preferences_formats(tmp_path):
    # TRL's three forms: text, messages with an explicit prompt, messages with the prompt implicit
    # (the messages both start with); each side becomes read_conversations' example of its reply.
    user = [{"role": "system", "content": "s"}, {"role": "user", "content": "q"}]
    good, bad = [{"role": "assistant", "content": "yes"}], [{"role": "assistant", "content": "no"}]
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in (
        {"prompt": "2+2=", "chosen": "4", "rejected": "5"},
        {"prompt": user, "chosen": good, "rejected": bad},
        {"chosen": user + good, "rejected": user + bad}, {})[:3]) + "\n")
    assert data.is_preference_data([path]) and not data.is_chat_data([path])
    text, explicit, implicit = data.read_preferences(path)
    assert text == ({"prompt": "2+2=", "completion": "4"}, {"prompt": "2+2=", "completion": "5"})
    assert explicit == implicit == ({"messages": user + good, "train_from": 2}, {"messages": user + bad, "train_from": 2})


def test_preference_margins(folders, tmp_path):
    # TRL's "margin" column (reward models): kept per pair, written to .margins.npy beside the kept
    # pairs (val every 10th), read by the loader; on some lines only, or not a number: an error.
    _, _, ours, _ = folders
    path = tmp_path / "prefs.jsonl"
    rows = [{"prompt": f"{i} + {i} =", "chosen": f" {2 * i}", "rejected": f" {i}", "margin": i / 4} for i in range(20)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.read_preferences(path)[3][0]["margin"] == 0.75
    data.prepare_preferences([path], ours, None, tmp_path / "out", val_fraction=0.1, show_progress=False)
    want = {"train": [i / 4 for i in range(20) if i % 10 != 9], "val": [i / 4 for i in range(20) if i % 10 == 9]}
    for name in ("train", "val"):
        np.testing.assert_array_equal(data.PackedLoader(tmp_path / "out" / f"{name}.bin", 2, 64).margins, want[name])
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "margin" or i}) + "\n" for i, r in enumerate(rows)))
    with pytest.raises(ValueError, match="19 of 20 preference pairs have a \"margin\""):
        data.prepare_preferences([path], ours, None, tmp_path / "out", val_fraction=0.1, show_progress=False)
    path.write_text(json.dumps({**rows[0], "margin": "big"}) + "\n")
    with pytest.raises(ValueError, match="prefs.jsonl:1: \"margin\" must be a finite number"):
        data.read_preferences(path)
    path.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "margin"}) + "\n" for r in rows))
    data.prepare_preferences([path], ours, None, tmp_path / "out", val_fraction=0.1, show_progress=False)
    assert not (tmp_path / "out" / "train.margins.npy").exists()  # (none left from before)


@pytest.mark.parametrize("row", [
    {"prompt": "a", "chosen": "b"},
    {"prompt": "a", "chosen": [{"role": "assistant", "content": "b"}], "rejected": "c"},
    {"chosen": [{"role": "user", "content": "a"}], "rejected": [{"role": "user", "content": "a"}]},  # no reply
    {"chosen": [{"role": "assistant", "content": "b"}], "rejected": [{"role": "assistant", "content": "c"}]},  # no prompt
])
def test_read_preferences_says_which_line(tmp_path, row):
    path = tmp_path / "prefs.jsonl"
    path.write_text(json.dumps({"prompt": "a", "chosen": "b", "rejected": "c"}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(ValueError, match="prefs.jsonl:2: expected"):
        data.read_preferences(path)


def test_prepare_preferences_files(folders, tmp_path):
    # Each pair: its chosen and rejected sequences as two documents, one after the other, each the
    # tokens of its example as prepare_chat makes them; .pairs.npy names them; val every 10th pair.
    marked, _, ours, _ = folders
    rng = random.Random(3)
    rows = []
    for i in range(30):
        prompt = conversation(rng, 1)[:-1]
        replies = [[{"role": "assistant", "content": conversation(rng, 1)[-1]["content"]}] for _ in range(2)]
        rows.append({"prompt": prompt, "chosen": replies[0], "rejected": replies[1]} if i % 2
                    else {"chosen": prompt + replies[0], "rejected": prompt + replies[1]})
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    stats = data.prepare_preferences([path], ours, marked, tmp_path / "out", val_fraction=0.1, show_progress=False)
    assert stats["train_pairs"] == 27 and stats["val_pairs"] == 3
    pairs = data.read_preferences(path)
    for name, chosen in (("train", [p for i, p in enumerate(pairs) if i % 10 != 9]),
                         ("val", [p for i, p in enumerate(pairs) if i % 10 == 9])):
        tokens = np.asarray(data.open_tokens(tmp_path / "out" / f"{name}.bin"))
        offsets = np.load(tmp_path / "out" / f"{name}.docs.npy")
        mask = np.load(tmp_path / "out" / f"{name}.mask.npy")
        assert np.load(tmp_path / "out" / f"{name}.pairs.npy").tolist() == [[2 * k, 2 * k + 1] for k in range(len(chosen))]
        for k, pair in enumerate(chosen):
            for side, example in enumerate(pair):
                ids, want = data.example_tokens(example, ours, marked)
                doc = slice(offsets[2 * k + side], offsets[2 * k + side + 1])
                assert tokens[doc].tolist() == ids and mask[doc].tolist() == want and any(want)
    # conversations written over them leave no pairs behind
    write_jsonl(tmp_path / "chats.jsonl", [conversation(rng, 1) for _ in range(4)])
    data.prepare_chat([tmp_path / "chats.jsonl"], ours, marked, tmp_path / "out", show_progress=False)
    assert data.PackedLoader(tmp_path / "out" / "train.bin", 1, 64).pairs is None


@pytest.mark.parametrize("lengths, want", [
    ((5, 7, 12), (5, 7)), ((5, 9, 12), (5, 7)), ((9, 5, 12), (7, 5)), ((9, 9, 12), (6, 6)),
    ((20, 30, 13), (6, 7)), ((6, 30, 12), (6, 6)),
])
def test_pair_lengths(lengths, want):
    assert data.pair_lengths(*lengths) == want and sum(want) <= lengths[2]


def test_packed_loader_places_pairs_together(tmp_path):
    # A pair's two documents side by side in one row (chosen first), cut together to fit; every
    # pair once per epoch; docs names each segment; placed counts pairs; ranks split the rows.
    rng = np.random.default_rng(4)
    lengths = [int(n) for n in rng.integers(1, 14, 60)]
    docs, _ = packed_set(tmp_path, lengths)
    order = rng.permutation(30)
    pairs = np.stack([order, order + 30], 1)  # any pairing of the documents
    np.save(tmp_path / "train.pairs.npy", pairs)
    T, B = 16, 3
    loader = data.PackedLoader(tmp_path / "train.bin", B, T, seed=1)
    whole = data.PackedLoader(tmp_path / "train.bin", 4, T, seed=1)
    halves = [data.PackedLoader(tmp_path / "train.bin", 2, T, seed=1, rank=r, world_size=2) for r in range(2)]
    seen = []
    for _ in range(16):
        x, y, cu = loader.next_batch()
        offsets = cu.tolist()
        assert len(offsets) == len(loader.docs) + 1
        real = [(i, d) for i, d in enumerate(loader.docs) if d >= 0]
        assert loader.placed == loader.global_placed == len(real) // 2
        for (i, c), (j, r) in zip(real[0::2], real[1::2]):
            assert j == i + 1 and offsets[i] // T == (offsets[j + 1] - 1) // T  # side by side in one row
            k = [list(p) for p in pairs].index([c, r])
            want = data.pair_lengths(lengths[c], lengths[r], T)
            assert (offsets[j] - offsets[i], offsets[j + 1] - offsets[j]) == want
            assert (x.view(-1)[offsets[i]:offsets[j]].numpy() == docs[c][:want[0]]).all()
            seen.append(k)
        for i, d in enumerate(loader.docs):
            if d < 0:
                assert offsets[i + 1] % T == 0 and (y.view(-1)[offsets[i]:offsets[i + 1]] == -1).all()
        whole_cu = whole.next_batch()[2]
        parts = [h.next_batch() for h in halves]  # 2 ranks of 2 rows: the 4 rows of one process
        assert halves[0].global_placed == whole.placed == halves[0].placed + halves[1].placed
        assert halves[0].docs + halves[1].docs == whole.docs
        assert torch.equal(torch.cat([parts[0][2][:-1], parts[1][2] + 2 * T]), whole_cu)
    assert sorted(seen[:30]) == list(range(30))
    np.save(tmp_path / "train.pairs.npy", pairs[:-1])
    with pytest.raises(data.TokenFileError, match="does not pair up"):
        data.PackedLoader(tmp_path / "train.bin", 2, 8)


def test_dpo_on_preference_pairs(chat_run_inputs, tmp_path, capsys):
    # `pyllm train --preference dpo` on TRL-style pairs in the chat template, from a Hugging Face folder
    # and then from that run; without --preference the pairs are refused with a message.
    folder, _ = chat_run_inputs
    rng = random.Random(2)
    path = tmp_path / "prefs.jsonl"
    with open(path, "w") as f:
        for _ in range(60):
            a, b = rng.randrange(100), rng.randrange(100)
            f.write(json.dumps({"prompt": [{"role": "user", "content": f"what is {a} plus {b}?"}],
                                "chosen": [{"role": "assistant", "content": f"{a + b}"}],
                                "rejected": [{"role": "assistant", "content": f"{a * b}"}]}) + "\n")
    assert cli.main(train_args(folder, path, tmp_path / "a", "--max-steps", "3", "--batch-size", "4",
                               "--preference", "dpo", "--ckpt-every", "2")) == 0
    out = capsys.readouterr()
    assert "60 preference pairs -> " in out.out and "reference model's log-probabilities" in out.err
    log = logged(tmp_path / "a")
    assert log[0]["loss"] == pytest.approx(np.log(2), abs=1e-6) and {"reward_margin", "val_reward_accuracy"} <= log[-1].keys()
    assert cli.main(["train", "--resume", str(tmp_path / "a"), "--max-steps", "4"]) == 0
    assert len(logged(tmp_path / "a")) == 4
    args = train_args(folder, path, tmp_path / "b", "--max-steps", "1", "--batch-size", "4")
    assert cli.main(args) == 2
    assert "give preference" in capsys.readouterr().err
    # --preference reward: a reward model on the same pairs, exported as transformers' sequence
    # classifier, which scores as the run's model does
    assert cli.main(train_args(folder, path, tmp_path / "rm", "--max-steps", "3", "--batch-size", "4",
                               "--preference", "reward")) == 0
    assert "sample (" not in capsys.readouterr().out  # a reward model scores; it is not sampled from
    assert {"reward_accuracy", "val_reward_accuracy"} <= logged(tmp_path / "rm")[-1].keys()
    assert cli.main(["export", "--run", str(tmp_path / "rm"), "--out", str(tmp_path / "rm-hf"), "--dtype", "fp32"]) == 0
    from pyllm.model import LLM

    ours = LLM.load(tmp_path / "rm" / "model.safetensors").eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm-hf").eval()
    idx = torch.randint(0, theirs.config.vocab_size, (1, 12))
    # its pad token TRL's (the tokenizer's pad, else eos), in the export: both read a sequence's score
    # at its last token that is not pad, the one before a trailing EOS
    pad = ours.config.pad_token_id
    assert pad is not None and theirs.config.pad_token_id == pad
    padded = torch.cat([idx, torch.tensor([[pad]])], 1)
    with torch.no_grad():
        torch.testing.assert_close(theirs(idx).logits, ours(idx, scores=True)[1], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(theirs(padded).logits, ours(padded, scores=True)[1], rtol=1e-4, atol=1e-5)
    # its tokenizer pads a batch (pad_token named in the export, as TRL saves pad = eos: it had raised)
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "rm-hf")
    batch = hf_tokenizer(["what is 2 plus 3?", "5"], padding=True, return_tensors="pt")
    assert hf_tokenizer.pad_token_id == pad and batch.input_ids.shape[0] == 2
    assert cli.main(train_args(folder, path, tmp_path / "rm-lora", "--max-steps", "1", "--batch-size", "4",
                               "--preference", "reward", "--lora-rank", "2")) == 0
    assert cli.main(["export", "--run", str(tmp_path / "rm-lora"), "--out", str(tmp_path / "x"), "--adapter"]) == 2
    assert "a reward model" in capsys.readouterr().err  # its head trained whole: no adapter says so


def test_hf_stop_ids_are_generation_config_json_s_where_it_names_them(tmp_path):
    # transformers' generate stops at generation_config.json's eos_token_id alone where that file
    # names one; config.json's is read only where it does not (the union had stopped at an id
    # transformers goes past: an audit, 2026-12-06)
    from pyllm.tokenizer.tokenizer import hf_stop_ids

    (tmp_path / "config.json").write_text(json.dumps({"eos_token_id": 27}))
    assert hf_stop_ids(tmp_path) == [27]
    (tmp_path / "generation_config.json").write_text(json.dumps({"do_sample": False}))
    assert hf_stop_ids(tmp_path) == [27]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [299, 87]}))
    assert hf_stop_ids(tmp_path) == [87, 299]


# Mistral v0.3's template (Mistral Small / Nemo's likewise): the system message goes into the last
# user turn only, so a conversation's earlier turns render differently alone than inside it
MISTRAL_V3 = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
    "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
    "{{- bos_token }}{%- for message in loop_messages %}{%- if message['role'] == 'user' %}"
    "{%- if loop.last and system_message is defined %}"
    "{{- '[INST] ' + system_message + '\\n\\n' + message['content'] + '[/INST]' }}"
    "{%- else %}{{- '[INST] ' + message['content'] + '[/INST]' }}{%- endif %}"
    "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content']|trim + eos_token }}"
    "{%- endif %}{%- endfor %}")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
def test_a_template_that_moves_the_system_message_finds_each_reply_in_place(tmp_path, kind):
    # Rendering prefixes cannot find Mistral v0.3's replies where a system message is given (it had
    # been refused); each reply is found where the whole conversation has it: the same ids and mask
    # as transformers' return_assistant_tokens_mask on the template marked with {% generation %}
    transformers = pytest.importorskip("transformers")
    marked = MISTRAL_V3.replace("{{- ' ' + message['content']|trim + eos_token }}",
                                "{% generation %}{{- ' ' + message['content']|trim + eos_token }}{% endgeneration %}")
    plain, twin = make_folder(tmp_path / "plain", MISTRAL_V3, kind), make_folder(tmp_path / "marked", marked, kind)
    ours = Tokenizer.from_hf(plain / "tokenizer.json")
    rng = random.Random(7)
    for turns in (1, 2, 3):
        talk = [{"role": "system", "content": "Be terse."}, *(m for m in conversation(rng, turns) if m["role"] != "system")]
        talk[-1]["content"] = " " + talk[-1]["content"] + " "  # (trimmed by the template)
        want = transformers.AutoTokenizer.from_pretrained(twin).apply_chat_template(
            talk, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert hf_chat_tokens(plain, ours, talk) == (list(want["input_ids"]), list(want["assistant_masks"]))


# a template that moves the system message as Mistral's does, with a generation prompt ending in a space
MOVING_SYSTEM = (
    "{%- set ns = namespace(last=-1) %}{%- for m in messages %}"
    "{%- if m.role == 'user' %}{%- set ns.last = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}{%- if m.role == 'user' %}User: "
    "{%- if loop.index0 == ns.last and messages[0].role == 'system' %}{{ ' ' + messages[0].content }}{%- endif %}"
    "{{ ' ' + m.content + '\\n' }}{%- elif m.role == 'assistant' %}Assistant: {{ m.content + eos_token + '\\n' }}"
    "{%- endif %}{%- endfor %}{%- if add_generation_prompt %}Assistant: {% endif %}")


@pytest.mark.parametrize("kind", ["byte-level", "sentencepiece"])
@pytest.mark.parametrize("reply", ["21 is the answer.", "Twenty-one.", "\u300c21\u300d"])
def test_a_reply_found_in_place_has_the_space_before_it_its_template_gives_it(tmp_path, kind, reply):
    # Mistral v0.3 writes " " + the reply: found in place (a system message given), its span began
    # at the reply's text, and a SentencePiece "\u2581" alone before a digit went untrained, where
    # rendering prefixes, TRL's completion mask and a {% generation %} block train it (from the
    # tool-calling audit); a space a generation prompt ends in ("Assistant: ") stays the prompt's
    talk = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "What is 20 plus 1?"},
            {"role": "assistant", "content": reply}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": reply}]
    for name, template, marked in [
            ("mistral", MISTRAL_V3, MISTRAL_V3.replace(
                "{{- ' ' + message['content']|trim + eos_token }}",
                "{% generation %}{{- ' ' + message['content']|trim + eos_token }}{% endgeneration %}")),
            ("moving", MOVING_SYSTEM, MOVING_SYSTEM.replace(
                "{{ m.content + eos_token + '\\n' }}",
                "{% generation %}{{ m.content + eos_token + '\\n' }}{% endgeneration %}"))]:
        plain = make_folder(tmp_path / f"{name}-plain", template, kind)
        twin = make_folder(tmp_path / f"{name}-marked", marked, kind)
        want = transformers.AutoTokenizer.from_pretrained(twin).apply_chat_template(
            talk, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        got = hf_chat_tokens(plain, Tokenizer.from_hf(plain / "tokenizer.json"), talk)
        assert got == (list(want["input_ids"]), list(want["assistant_masks"])), name
    # a tool call (no text to find in place) under Mistral's moving system message: refused, saying
    # so and how to go on (it had blamed templates that drop earlier reasoning)
    call = {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "add",
                                                                                                 "arguments": {}}}]}
    with pytest.raises(ValueError, match=r"assistant message 2 is a tool call.*--chat-template FILE"):
        hf_chat_spans(tmp_path / "mistral-plain", [*talk[:2], call, *talk[3:]])


# --- packed fine-tuning over several processes ---------------------------------------------------

# trains (TrainConfig of argv[1]) and prints how far apart the ranks' weights end
RANK_WEIGHTS_WORKER = r"""
import sys, json, torch, torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from pyllm.train import TrainConfig, train, end_process
args = json.loads(sys.argv[1])
model = train(TrainConfig(**args))["model"]
state = (get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)) if args["dist_mode"] == "fsdp"
         else model.state_dict())
flat = torch.cat([t.float().flatten() for t in state.values()])
got = [torch.zeros_like(flat) for _ in range(dist.get_world_size())]
dist.all_gather(got, flat)
if dist.get_rank() == 0:
    print("APART", max((got[0] - g).abs().max().item() for g in got))
end_process(0)
"""


@pytest.fixture(scope="module")
def cut_chats(tmp_path_factory):
    root = tmp_path_factory.mktemp("cut")
    folder = make_folder(root / "hf", PLAIN, model=True)
    rng = random.Random(1)
    with open(root / "chats.jsonl", "w") as f:
        for _ in range(40):
            a, b = rng.randrange(100), rng.randrange(100)
            long = " please think about it very carefully" * 12 if rng.random() < 0.5 else ""
            f.write(json.dumps({"messages": [{"role": "user", "content": f"what is {a} plus {b}?{long}"},
                                             {"role": "assistant", "content": f"{a + b}"}]}) + "\n")
    return folder, root / "chats.jsonl"


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_a_rank_without_trained_tokens_still_steps(cut_chats, tmp_path, mode):
    # A packed fine-tuning step where one rank's rows hold no trained token (replies cut away by
    # --seq-len) while another's do is a step like any other: the empty rank had skipped its
    # optimizer step alone (DDP: replicas drifting apart without a word, losses logged null; FSDP /
    # ZeRO-1: a collective mismatch, SIGABRT). 2 processes give the 1-process run's losses and every
    # rank the same weights (from the 3-process audit)
    folder, chats = cut_chats
    common = ["--init-from-hf", str(folder), "--data", str(chats), "--lr", "1e-3", "--warmup-steps", "1",
              "--seq-len", "48", "--eval-every", "0", "--eval-batches", "1", "--sample-tokens", "0", "--seed", "5",
              "--max-steps", "6", "--device", "cpu", "--val-fraction", "0.2"]
    assert cli.main(["train", *common, "--batch-size", "2", "--out", str(tmp_path / "one")]) == 0
    one = [json.loads(line) for line in (tmp_path / "one" / "log.jsonl").read_text().splitlines()]
    assert all(r["loss"] is not None for r in one)  # every global batch holds trained tokens
    args = dict(data_dir=str(tmp_path / "one" / "data"), out_dir=str(tmp_path / "two"), init_from_hf=str(folder),
                batch_size=1, seq_len=48, max_steps=6, lr=1e-3, warmup_steps=1, eval_every=0, eval_batches=1,
                seed=5, device="cpu", dist_mode=mode, progress=False)
    out = run_torchrun(2, ["--no-python", sys.executable, "-c", RANK_WEIGHTS_WORKER, json.dumps(args)],
                       timeout=300, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    assert float(out.stdout.split("APART")[1].split()[0]) == 0.0
    two = [json.loads(line) for line in (tmp_path / "two" / "log.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in two] == [False] * 6
    assert [r["loss"] for r in two] == pytest.approx([r["loss"] for r in one], rel=1e-5)


def test_grpo_under_fsdp_with_a_rank_without_samples(tmp_path):
    # GRPO under 3-process FSDP2 where one rank's prompt is cut by --seq-len (no samples) while the
    # others sample: FSDP2 had kept the sampling forwards' order for the next backward, so the
    # ranks that sampled prefetched a block the other did not and all hung (gloo's 30 minutes);
    # and a step with no sampled token on any rank had been stepped (AdamW moved the weights):
    # skipped, its loss null (from the GRPO / KTO / GKD 3-process audit)
    rows = []
    for i in range(24):  # every other prompt longer than --seq-len: cut, no samples
        question = f"what is {i} plus {i + 1}?" + (" please think hard about it and explain" * 6 if i % 2 else "")
        rows.append({"prompt": [{"role": "user", "content": question}]})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "rw.py").write_text("def r(completions, **kw):\n    return [float(len(str(c))) for c in completions]\n")
    make_folder(tmp_path / "hf", PLAIN, model=True)
    command = ["-m", "pyllm", "train", "--device", "cpu", "--init-from-hf", str(tmp_path / "hf"),
               "--data", str(tmp_path / "p.jsonl"), "--seq-len", "48", "--batch-size", "1", "--max-steps", "4",
               "--eval-every", "0", "--sample-tokens", "0",
               "--grpo-reward", f"{tmp_path / 'rw.py'}:r", "--grpo-generations", "3", "--grpo-max-new-tokens", "6",
               "--dist-mode", "fsdp", "--seed", "5", "--out", str(tmp_path / "run")]
    out = run_torchrun(3, command, timeout=240, cwd=tmp_path, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert len(log) == 4 and all(r["skipped"] == (r["tokens"] == 0) for r in log)
    assert [r["loss"] is None for r in log] == [r["tokens"] == 0 for r in log] and not all(r["tokens"] for r in log)


def test_generate_stop_strings_over_the_prompts_tokens_as_transformers(tmp_path, capsys):
    # --stop TEXT may begin in the prompt: over the text of its tokens, as transformers' StopStringCriteria
    # reads them, not the prompt as given: a SentencePiece tokenizer writes a "▁" (a space) before it
    # and after a special token in it ("é" is " é"; "x <|im_start|> y" is " x <|im_start|>  y"). The raw
    # prompt's text had missed a stop string beginning at that space and matched one transformers does not
    folder = make_folder(tmp_path / "sp", PLAIN, "sentencepiece", model=True)
    theirs = transformers.AutoTokenizer.from_pretrained(folder)
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    ours = Tokenizer.from_hf(folder / "tokenizer.json")
    checked = 0
    for prompt in ("é", "x <|im_start|> y"):
        ids = theirs(prompt, return_tensors="pt")
        full = model.generate(**ids, max_new_tokens=8, do_sample=False)[0, ids["input_ids"].shape[1]:].tolist()
        head, first = ours.decode(ids["input_ids"][0].tolist()), ours.decode(full[:1])
        assert head != prompt and not first.startswith("\ufffd")
        # beginning at the space the tokenizer put in; the prompt's own spelling of the same
        for stop in (head[-3:] + first[:2], prompt[-3:] + first[:2]):
            out = model.generate(**ids, max_new_tokens=8, do_sample=False, stop_strings=[stop], tokenizer=theirs)
            want = ours.decode([t for t in out[0, ids["input_ids"].shape[1]:].tolist() if t != theirs.eos_token_id])
            checked += len(want) == len(first)  # (transformers ended at the first token)
            base = ["generate", "--hf", str(folder), "--max-new-tokens", "8", "--temperature", "0", "--device", "cpu",
                    "--stop", stop]
            capsys.readouterr()
            assert cli.main([*base, "--prompt", prompt]) == 0
            assert capsys.readouterr().out.split("\n" + "-" * 60)[0] == prompt + want, (prompt, stop)
            (tmp_path / "p.jsonl").write_text(json.dumps({"prompt": prompt}) + "\n")
            assert cli.main([*base, "--prompts-file", str(tmp_path / "p.jsonl"), "--out",
                             str(tmp_path / "c.jsonl")]) == 0
            assert json.loads((tmp_path / "c.jsonl").read_text())["completion"] == want, (prompt, stop)
    assert checked >= 2
