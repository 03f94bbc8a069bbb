"""Settings (settings.py): the one place that lists what is not architecture, its file
keys, the two meanings of last_p, and the checks."""

import dataclasses

import pytest

from mlx_sharedllm import Settings, SharedLLMConfig
from mlx_sharedllm.cache import TreeFormat
from mlx_sharedllm.settings import IN_ADAPTERS, IN_TREES, keys, read_config


def test_the_defaults_are_the_papers_tree():
    s = Settings()
    assert (s.tree_depth, s.keep_tokens, s.keep_fraction, s.policy) == (3, 32, None, "query")
    assert (s.compress_batch, s.chunks_per_question, s.reread_tokens) == (8, 0, 0)
    assert s.log_scale_entries == 0 and s.tree_format is None


def test_last_p_is_a_count_or_a_fraction_never_both():
    assert Settings.from_dict({"last_p": 1}).keep_tokens == 1
    one = Settings.from_dict({"last_p": 1.0})
    assert (one.keep_tokens, one.keep_fraction) == (None, 1.0)
    assert Settings(keep_fraction=1).keep_fraction == 1.0  # a fraction of 1 is not a count
    assert Settings.from_dict({"last_p": "0.125"}).keep_fraction == 0.125  # released configs
    assert Settings.from_dict({"last_p": "32"}).keep_tokens == 32
    with pytest.raises(ValueError, match="keep_tokens or keep_fraction, not both"):
        Settings(keep_tokens=4, keep_fraction=0.5)
    with pytest.raises(ValueError, match="keep_fraction must be a fraction"):
        Settings(keep_fraction=1.5)
    with pytest.raises(ValueError, match="keep_tokens must be an integer"):
        Settings(keep_tokens=2.0)
    s = Settings(keep_tokens=4)
    with pytest.raises(ValueError, match="not both"):
        dataclasses.replace(s, keep_fraction=0.5)
    assert dataclasses.replace(s, keep_tokens=None, keep_fraction=0.5).to_dict()["last_p"] == 0.5


def test_files_keep_their_keys_and_read_back_alike():
    s = Settings(
        tree_depth=2,
        keep_fraction=0.25,
        policy="right",
        compress_batch=3,
        log_scale_entries=64,
        chunks_per_question=5,
        reread_tokens=256,
        tree_format=TreeFormat("float16", 8, 32),
    )
    written = s.to_dict()
    assert written == {
        "tree_depth": 2,
        "last_p": 0.25,
        "policy": "right",
        "compress_batch": 3,
        "log_scale_entries": 64,
        "select_chunks": 5,
        "reread_tokens": 256,
        "tree_format": {"dtype": "float16", "bits": 8, "group_size": 32},
    }
    assert Settings.from_dict(written) == s
    assert "tree_format" not in Settings().to_dict()  # config.json as it always was
    assert keys(IN_TREES) == ("tree_depth", "last_p", "policy")
    assert keys(IN_ADAPTERS) == ("log_scale_entries", "select_chunks", "reread_tokens")
    assert s.to_dict(IN_ADAPTERS) == {k: written[k] for k in keys(IN_ADAPTERS)}


def test_the_description_lists_no_setting():
    described = {f.name for f in dataclasses.fields(SharedLLMConfig)}
    assert not described & set(Settings().to_dict()), "a key in two places"
    assert not described & {f.name for f in dataclasses.fields(Settings)}


def test_recorded_settings_replace_only_their_role():
    s = Settings(tree_depth=2, keep_tokens=4, chunks_per_question=3)
    taken = s.with_recorded({"log_scale_entries": 16, "tree_depth": 1}, IN_ADAPTERS)
    assert taken == dataclasses.replace(s, log_scale_entries=16, chunks_per_question=0)
    with pytest.raises(ValueError, match="reread_tokens"):
        s.with_recorded({"reread_tokens": 5}, IN_ADAPTERS)


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"policy": "left"}, "policy must be one of"),
        ({"compress_batch": 0}, "compress_batch must be >= 1"),
        ({"tree_depth": 10**12}, "tree_depth must be in 1..21"),
        ({"tree_format": {"bits": 4, "size": 2}}, "tree_format must be an object"),
        ({"tree_format": {"bits": 3}}, "tree bits must be one of"),
        ({"select_chunks": -1}, r"chunks_per_question \(select_chunks\) must be 0"),
    ],
)
def test_bad_settings_are_refused(changes, message):
    with pytest.raises(ValueError, match=message):
        Settings.from_dict(changes)


def test_a_config_is_read_as_description_and_settings():
    llama = {"hidden_size": 32, "num_hidden_layers": 3, "intermediate_size": 48}
    llama |= {"num_attention_heads": 4, "rms_norm_eps": 1e-5, "vocab_size": 97}
    params = {"upper": llama, "lower": None, "num_injection_layers": 2, "chunk_len": 32}
    config, settings = read_config({**params, "tree_depth": 2, "last_p": 0, "select_chunks": 2})
    assert config.chunk_len == 32 and not hasattr(config, "tree_depth")
    assert (settings.tree_depth, settings.keep_tokens, settings.chunks_per_question) == (2, 0, 2)
    with pytest.raises(ValueError, match="tree_depth must be in 1..6"):
        read_config({**params, "tree_depth": 7})  # chunks of 32 halve at most 5 times
    with pytest.raises(ValueError, match="chunk_len 34 cannot be halved 2 times"):
        read_config({**params, "chunk_len": 34, "tree_depth": 3})
