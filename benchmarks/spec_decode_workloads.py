"""The speculative-decoding benchmark's inputs: its prompts and its layer-skip draft model.

- echo-heavy: answers that repeat the prompt. Code editing ("rename variable X to Y and output
  the whole function") on functions of this repository's own source, picked with `ast`, and
  summarise-and-quote ("quote this paragraph exactly, then summarise it") on prose paragraphs
  of README.md and the modules' docstrings. Half of each, interleaved.
- plain chat: short general questions written here (nothing in the prompt to copy).

Both are chat prompts rendered through the model's chat template (the text /v1/chat/completions
would build; the SmolLM2 tokenizer adds no special tokens of its own, so /v1/completions sees the
same token ids). Selection is deterministic for a given checkout.

The draft for `--speculative draft-model`: no smaller SmolLM2 ships locally, so the draft is the
default model itself cut to its first N decoder layers (self-speculative layer skipping), saved
as a Hugging Face directory that shares the target's tokenizer.
"""

from __future__ import annotations

import ast
import json
import pathlib
import re
import shutil
import textwrap
from collections import Counter
from collections.abc import Iterator, Sequence
from typing import Any

from benchmarks.load.datasets import BenchRequest

ROOT = pathlib.Path(__file__).resolve().parent.parent
CODE_GLOBS = ("engine/*.py", "engine/spec/*.py", "engine/models/*.py", "npu_sim/*.py")
PROSE_FILES = ("README.md",)
PROSE_DOCSTRING_GLOBS = ("engine/*.py", "npu_sim/*.py", "server/*.py")
MIN_FUNCTION_LINES, MAX_FUNCTION_LINES, MAX_FUNCTION_CHARS = 8, 25, 900
MIN_PARAGRAPH_CHARS, MAX_PARAGRAPH_CHARS = 250, 700

PLAIN_QUESTIONS = (
    "What is the capital of Australia?", "Why is the sky blue?",
    "Give me three tips for sleeping better.", "What does a bee do in winter?",
    "How many legs does a spider have?", "What is photosynthesis?",
    "Suggest a name for a pet goldfish.", "Why do cats purr?",
    "What is the difference between weather and climate?", "How do I boil an egg?",
    "Who painted the Mona Lisa?", "What is a prime number?",
    "Name three fruits that are high in vitamin C.", "How does a rainbow form?",
    "What should I pack for a weekend hiking trip?", "Why do leaves change colour in autumn?",
    "What is the tallest mountain on Earth?", "How can I stay focused while studying?",
    "What is the boiling point of water at sea level?", "Explain gravity to a child.",
    "What are the primary colours?", "How do airplanes stay in the air?",
    "Recommend a good habit to start this week.", "What is the largest ocean?",
    "Why is exercise good for you?", "What is the speed of light?",
    "Write a short poem about the sea.", "How do vaccines work?",
    "What is a healthy breakfast?", "Why do we have seasons?",
    "How many continents are there?", "What makes a good friend?",
)


def chat_prompt(tokenizer: Any, user_text: str, output_len: int) -> BenchRequest:
    """One user turn through the chat template, as a completions request."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": user_text}],
                                         tokenize=False, add_generation_prompt=True)
    num_tokens = len(tokenizer(text, add_special_tokens=False).input_ids)
    return BenchRequest(text, num_tokens, output_len)


# ----------------------------------------------------------------------------- echo-heavy


def _files(globs: Sequence[str], root: pathlib.Path) -> list[pathlib.Path]:
    return sorted({p for g in globs for p in root.glob(g) if p.is_file()})


def _spread(items: Sequence[Any], num: int) -> list[Any]:
    """`num` items spread evenly over `items` (all of them, cycling, when there are fewer)."""
    if not items:
        raise ValueError("nothing to pick from")
    if num <= len(items):
        return [items[i * len(items) // num] for i in range(num)]
    return [items[i % len(items)] for i in range(num)]


def _rename_target(node: ast.FunctionDef) -> str | None:
    """The function's most used local name (an argument or an assigned name), if any."""
    local = {a.arg for a in node.args.args + node.args.kwonlyargs} - {"self", "cls"}
    local |= {n.id for n in ast.walk(node) if isinstance(n, ast.Name)
              and isinstance(n.ctx, ast.Store)}
    uses = Counter(n.id for n in ast.walk(node) if isinstance(n, ast.Name) and n.id in local)
    uses.update(a.arg for a in node.args.args + node.args.kwonlyargs if a.arg in local)
    best = [name for name, count in uses.most_common() if len(name) > 1 and count >= 3]
    return best[0] if best else None


def code_snippets(root: pathlib.Path = ROOT) -> list[tuple[str, str]]:
    """(function source, name to rename) for every undecorated function of MIN..MAX lines (and
    at most MAX_FUNCTION_CHARS) in CODE_GLOBS, in file and line order."""
    out = []
    for path in _files(CODE_GLOBS, root):
        source = path.read_text(encoding="utf-8")
        lines = source.splitlines()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.FunctionDef) or node.decorator_list:
                continue
            assert node.end_lineno is not None
            if not MIN_FUNCTION_LINES <= node.end_lineno - node.lineno + 1 <= MAX_FUNCTION_LINES:
                continue
            code = textwrap.dedent("\n".join(lines[node.lineno - 1:node.end_lineno]))
            name = _rename_target(node)
            if name and len(code) <= MAX_FUNCTION_CHARS:
                out.append((node.lineno, str(path), code, name))
    return [(code, name) for _, _, code, name in sorted(out, key=lambda x: (x[1], x[0]))]


def _paragraphs(text: str) -> Iterator[str]:
    for block in re.split(r"\n\s*\n", text):
        lines = [line.strip() for line in block.strip().splitlines()]
        if not lines or lines[0].startswith(("#", "```", "|", "-", "*", "$", ">", "<")):
            continue
        paragraph = " ".join(lines)
        if MIN_PARAGRAPH_CHARS <= len(paragraph) <= MAX_PARAGRAPH_CHARS:
            yield paragraph


def prose_paragraphs(root: pathlib.Path = ROOT) -> list[str]:
    """Prose paragraphs of README.md, then of the modules' docstrings, in file order."""
    out: list[str] = []
    for name in PROSE_FILES:
        if (root / name).is_file():
            out += _paragraphs((root / name).read_text(encoding="utf-8"))
    for path in _files(PROSE_DOCSTRING_GLOBS, root):
        doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        out += _paragraphs(doc or "")
    return list(dict.fromkeys(out))


def echo_requests(tokenizer: Any, num_prompts: int, output_len: int,
                  root: pathlib.Path = ROOT) -> list[BenchRequest]:
    """Code-editing and quote-then-summarise prompts, alternating (code first)."""
    codes = _spread(code_snippets(root), (num_prompts + 1) // 2)
    prose = _spread(prose_paragraphs(root), num_prompts // 2)
    texts = []
    for i in range(num_prompts):
        if i % 2 == 0:
            code, name = codes[i // 2]
            texts.append(f"Here is a Python function:\n```python\n{code}\n```\nRename the "
                         f"variable `{name}` to `new_{name}` and output the whole function.")
        else:
            texts.append("Quote the following paragraph exactly, then summarise it in one "
                         f"sentence:\n\n{prose[i // 2]}")
    return [chat_prompt(tokenizer, t, output_len) for t in texts]


def chat_requests(tokenizer: Any, num_prompts: int, output_len: int) -> list[BenchRequest]:
    """The plain questions (cycled when more are asked for than there are)."""
    return [chat_prompt(tokenizer, q, output_len) for q in _spread(PLAIN_QUESTIONS, num_prompts)]


# --------------------------------------------------------------------------- layer-skip draft

DRAFT_MARKER = "xyserve-layer-skip.json"


def layer_skip_draft(model_dir: pathlib.Path, num_layers: int, out_dir: pathlib.Path,
                     ) -> pathlib.Path:
    """A copy of the HF directory `model_dir` keeping only its first `num_layers` decoder layers
    (config `num_hidden_layers` edited, safetensors re-saved, tokenizer files copied), written
    to `out_dir/<name>-first<N>layers` once (a marker file says the copy is complete)."""
    from safetensors.torch import load_file, save_file

    config = json.loads((model_dir / "config.json").read_text())
    total = int(config["num_hidden_layers"])
    if not 1 <= num_layers <= total:
        raise ValueError(f"--draft-layers must be in [1, {total}], got {num_layers}")
    target = out_dir / f"{model_dir.name}-first{num_layers}layers"
    if (target / DRAFT_MARKER).is_file():
        return target
    target.mkdir(parents=True, exist_ok=True)
    keep = re.compile(r"model\.layers\.(\d+)\.")
    for path in sorted(model_dir.iterdir()):
        if path.suffix == ".safetensors":
            tensors = {k: v for k, v in load_file(str(path)).items()
                       if (m := keep.match(k)) is None or int(m.group(1)) < num_layers}
            save_file(tensors, str(target / path.name), metadata={"format": "pt"})
        elif path.is_file() and path.name not in ("config.json", "xyserve-source.json"):
            shutil.copy2(path, target / path.name)
    config["num_hidden_layers"] = num_layers
    (target / "config.json").write_text(json.dumps(config, indent=2))
    (target / DRAFT_MARKER).write_text(json.dumps({"source": str(model_dir),
                                                   "num_layers": num_layers, "of": total}))
    return target
