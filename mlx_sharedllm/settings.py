"""Settings: every choice of a run that is not architecture.

The model description (config.py) says what the weights compute and is fixed once a
model is made. Settings say how a run uses it: how contexts become trees, how many
chunks a question reads, how much is re-read, how the injection's attention is scaled,
how compression is batched and how trees are stored. A model holds its default settings
(read from its folder's config.json, or an adapter's); `compress` and `generate` take
others as a keyword argument.

`chunk_len` is not a setting: it stays in the description. The lower model was trained
to encode chunks of that many tokens from position 0, the injection reads chunk-level
positions counted in those chunks, and a document is cut into them; another chunk length
is another model (its fingerprint and its trees' differ), not another run.

config.json stays flat, as it always was: `to_dict` and `from_dict` read and write these
settings under the keys the files have used (`last_p` holds `keep_tokens` or
`keep_fraction`, `select_chunks` holds `chunks_per_question`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .cache import TreeFormat
from .config import MAX_CHUNK_LEN, SharedLLMConfig, check_int, is_int

POLICIES = ("query", "right")
# Re-reading reads passages of this many tokens (reread.py).
PASSAGE_TOKENS = 128
# The re-reading budget a model stacked from one records when converted: its injection is
# untrained, so re-reading is what lets it answer from the context (the shipped adapter
# records the same).
STACKED_REREAD_TOKENS = 512
# Where a setting is recorded besides config.json: in a tree's metadata and the model's
# fingerprint (what a tree holds depends on it), or in an adapter (which carries it onto
# the model it is loaded on).
IN_TREES, IN_ADAPTERS = "tree", "adapter"
DEFAULT_KEEP_TOKENS = 32


def _setting(default: Any, role: str | None = None, key: str | None = None) -> Any:
    """A settings field; `key` is its name in files when that differs from its own."""
    return field(default=default, metadata={"role": role, "key": key})


@dataclass(frozen=True)
class Settings:
    """How a run builds, stores and reads context trees (see the module docstring).

    Tree building (SPEC section 3): a chunk is split `tree_depth - 1` times, each time
    into halves of which `policy` picks one to split again ("query": the half more like
    the query; "right": always the right one); each preserved node keeps either
    `keep_tokens` tokens (0 or less: all of them) or, when `keep_fraction` is given,
    that fraction of its tokens. Exactly one of the two is in effect: give
    `keep_fraction` and `keep_tokens` stays None; give neither and `keep_tokens` is 32.

    `chunks_per_question`: how many chunks a question reads, those its injection heads
    attend to most (0: every chunk; selection.py). `reread_tokens`: up to this many
    tokens of the passages the question points at are read again in full, in the running
    text (0: off; reread.py). `log_scale_entries`: on trees of more entries, the
    injection's attention logits are scaled by log(entries) / log(this) (0: off;
    model.log_scale). `compress_batch`: chunks compressed at once. `tree_format`: how a
    new tree stores its entries (None: the model's float dtype).
    """

    tree_depth: int = _setting(3, IN_TREES)
    keep_tokens: int | None = _setting(None, IN_TREES, "last_p")
    keep_fraction: float | None = _setting(None, IN_TREES, "last_p")
    policy: str = _setting("query", IN_TREES)
    compress_batch: int = _setting(8)
    log_scale_entries: int = _setting(0, IN_ADAPTERS)
    chunks_per_question: int = _setting(0, IN_ADAPTERS, "select_chunks")
    reread_tokens: int = _setting(0, IN_ADAPTERS)
    tree_format: TreeFormat | None = _setting(None)

    def __post_init__(self) -> None:
        if self.keep_tokens is None and self.keep_fraction is None:
            object.__setattr__(self, "keep_tokens", DEFAULT_KEEP_TOKENS)
        if is_int(self.keep_fraction):  # a fraction of 1 is 1.0, never a count
            object.__setattr__(self, "keep_fraction", float(self.keep_fraction))
        # Bounds 2**depth before a chunk length checks it (check_tree_depth).
        check_int("tree_depth", self.tree_depth, 1, MAX_CHUNK_LEN.bit_length())
        check_keep(self.keep_tokens, self.keep_fraction)
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {self.policy!r}")
        check_int("compress_batch", self.compress_batch, 1)
        check_log_scale(self.log_scale_entries)
        check_chunks_per_question(self.chunks_per_question)
        check_reread_tokens(self.reread_tokens)
        if self.tree_format is not None and not isinstance(self.tree_format, TreeFormat):
            raise ValueError(f"tree_format must be a TreeFormat, got {self.tree_format!r}")

    @classmethod
    def from_dict(cls, params: dict[str, Any]) -> Settings:
        """Read the settings a config.json, an adapter or a tree records, under their file
        keys (absent keys keep their defaults; other keys are ignored)."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = file_key(f)
            if key in params and key != "last_p":
                values[f.name] = params[key]
        if "last_p" in params:
            last_p = parse_last_p(params["last_p"])
            name = "keep_fraction" if isinstance(last_p, float) else "keep_tokens"
            values[name] = last_p
        if "tree_format" in values:
            values["tree_format"] = _tree_format(values["tree_format"])
        return cls(**values)

    def to_dict(self, role: str | None = None) -> dict[str, Any]:
        """The settings under their file keys: all of them (the tree format only when one
        is set), or those of one role (IN_TREES, IN_ADAPTERS)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):
            if role is None or f.metadata["role"] == role:
                out[file_key(f)] = getattr(self, f.name)
        if "last_p" in out:  # the SPEC's last_p: the fraction when one is set, else the count
            out["last_p"] = self.keep_tokens if self.keep_fraction is None else self.keep_fraction
        if out.get("tree_format") is not None:
            out["tree_format"] = dataclasses.asdict(self.tree_format)
        elif "tree_format" in out:
            del out["tree_format"]
        return out

    def with_recorded(self, recorded: dict[str, Any], role: str) -> Settings:
        """These settings with those of `role` taken from `recorded` (file keys, as an
        adapter records them; a key it lacks takes its default)."""
        taken = Settings.from_dict({key: recorded[key] for key in keys(role) if key in recorded})
        names = [f.name for f in dataclasses.fields(self) if f.metadata["role"] == role]
        return dataclasses.replace(self, **{name: getattr(taken, name) for name in names})


def _tree_format(value: Any) -> TreeFormat | None:
    """A tree format as files write it: null, or an object of dtype, bits, group_size."""
    if value is None:
        return None
    try:
        return TreeFormat(**value)
    except TypeError:
        raise ValueError(
            f"tree_format must be an object of dtype, bits and group_size, got {value!r}"
        ) from None


def file_key(f: dataclasses.Field) -> str:
    """A settings field's key in config.json, adapters and trees."""
    return f.metadata["key"] or f.name


def keys(role: str) -> tuple[str, ...]:
    """The file keys of the settings of one role (IN_TREES, IN_ADAPTERS), in field order."""
    fields = dataclasses.fields(Settings)
    return tuple(dict.fromkeys(file_key(f) for f in fields if f.metadata["role"] == role))


def read_config(params: dict[str, Any]) -> tuple[SharedLLMConfig, Settings]:
    """A flat config.json read as the model description and its default settings, the
    tree depth checked against the chunk length (first: its bound is the tighter one)."""
    config = SharedLLMConfig.from_dict(params)
    check_tree_depth(params.get("tree_depth", Settings().tree_depth), config.chunk_len)
    return config, Settings.from_dict(params)


def parse_last_p(value: int | float | str) -> int | float:
    """Read `last_p` as the released config writes it: "32" is an int (tokens kept per
    node, <= 0: all), "0.125" a float (the fraction kept, in (0, 1])."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"last_p must be a number, got {value!r}")
    if isinstance(value, str):
        value = _number(value.strip())
    if isinstance(value, float) and not 0 < value <= 1:
        raise ValueError(f"last_p as a fraction must be in (0, 1], got {value}")
    return value


def _number(text: str) -> int | float:
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"last_p must be an int or a float, got {text!r}") from None


def check_keep(tokens: int | None, fraction: float | None) -> None:
    """Exactly one of a count of tokens (any integer; <= 0 keeps all) and a fraction in
    (0, 1] says what a tree node keeps."""
    if (tokens is None) == (fraction is None):
        raise ValueError(
            f"give keep_tokens or keep_fraction, not both, got {tokens!r} and {fraction!r}"
        )
    if tokens is not None and not is_int(tokens):
        raise ValueError(f"keep_tokens must be an integer, got {tokens!r}")
    if fraction is not None and (not isinstance(fraction, float) or not 0 < fraction <= 1):
        raise ValueError(f"keep_fraction must be a fraction in (0, 1], got {fraction!r}")


def check_tree_depth(depth: int, chunk_len: int) -> None:
    """Every split above the last level halves a node, so a chunk of `chunk_len` tokens
    must have an even length at each of them, and leave two leaves."""
    # Before 2**depth: a chunk halves at most log2(len) times.
    check_int("tree_depth", depth, 1, int(chunk_len).bit_length())
    if chunk_len % (2 ** (depth - 1)) or chunk_len < 2**depth:
        raise ValueError(
            f"chunk_len {chunk_len} cannot be halved {depth - 1} times and still leave two "
            f"leaves: use a multiple of {2 ** (depth - 1)} that is at least {2**depth}"
        )


def check_log_scale(entries: int) -> None:
    """`log_scale_entries` is 0 (off) or a number of entries, at least 2 (log(1) is 0)."""
    if not is_int(entries) or entries < 0 or entries == 1:
        raise ValueError(f"log_scale_entries must be 0 (off) or at least 2, got {entries!r}")


def check_chunks_per_question(chunks: int) -> None:
    """How many chunks a question reads: 0 (every chunk) or more."""
    if not is_int(chunks) or chunks < 0:
        raise ValueError(
            f"chunks_per_question (select_chunks) must be 0 (every chunk) or more, got {chunks!r}"
        )


def check_reread_tokens(tokens: int) -> None:
    """`reread_tokens` is 0 (off) or a budget of at least one passage."""
    if not is_int(tokens) or tokens < 0:
        raise ValueError(f"reread_tokens must be 0 (off) or a number of tokens, got {tokens!r}")
    if 0 < tokens < PASSAGE_TOKENS:
        raise ValueError(
            f"reread_tokens must be 0 (off) or at least one passage ({PASSAGE_TOKENS}), "
            f"got {tokens}"
        )
