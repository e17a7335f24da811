"""Which topology specs are file paths, the same for ``topology.load`` and the command line; spec
arguments checked like spec files; build errors that name the spec."""

import re

import pytest
import torch

from gnn_transformer import topology as T
from gnn_transformer.experiments.topologies import label, parse_spec, topology_fn


def test_a_file_in_the_current_directory_never_shadows_a_catalogue_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "full").write_text("not toml [\n")
    (tmp_path / "causal.toml").write_text('builder = "full"\n')
    assert T.read_spec("full").path == T.catalogue()["full"]
    assert torch.equal(T.load("full", 4).as_tensor(), T.full(4).as_tensor())
    assert torch.equal(topology_fn("full")([4]).as_tensor(), T.full(4).as_tensor())
    assert torch.equal(topology_fn("causal")([4]).as_tensor(), T.causal(4).as_tensor())
    # a path is a path: it ends in .toml or contains a separator
    assert torch.equal(T.load("causal.toml", 4).as_tensor(), T.full(4).as_tensor())
    with pytest.raises(ValueError, match="not valid TOML"):
        T.load("./full", 4)
    with pytest.raises(ValueError, match="not valid TOML"):
        topology_fn("./full")


def test_a_colon_in_a_spec_path(tmp_path):
    path = tmp_path / "co:lon.toml"
    path.write_text('builder = "sliding_window"\n[params]\nwindow = 1\n')
    assert parse_spec(str(path)) == (str(path), {})
    assert label(str(path)) == str(path)
    want = T.sliding_window(6, 1).as_tensor()
    assert torch.equal(topology_fn(str(path))([6]).as_tensor(), want)
    assert torch.equal(T.load(str(path), 6).as_tensor(), want)
    windows = "C:\\specs\\x.toml"  # a Windows path is not split at its drive letter
    assert parse_spec(windows) == (windows, {})
    with pytest.raises(ValueError, match="No spec file"):
        topology_fn(windows)


@pytest.mark.parametrize(
    "spec, message",
    [
        ("bigbird:seed=-1", "key 'seed': expected >= 0 (got -1)"),  # as graphs/*.toml require
        ("sliding_window:window=99999999999999999999", "key 'window': expected <= 2147483647"),
        ("random:k=3,seed=9223372036854775808", "key 'seed': expected <= 9223372036854775807"),
        ("random:k=2.5", "key 'k': expected an integer (got float 2.5)"),
        ("bigbird:global_at=middle", "key 'global_at': expected one of ['start', 'ends']"),
    ],
)
def test_command_line_arguments_are_checked_like_spec_files(spec, message):
    with pytest.raises(ValueError) as info:
        topology_fn(spec)
    assert str(info.value).startswith(f"topology spec {spec!r}: ")
    assert message in str(info.value)


def test_optional_argument_none_is_the_default():
    assert torch.equal(topology_fn("global_tokens:window=none")([5]).as_tensor(), T.global_tokens(5).as_tensor())


def test_build_errors_name_the_spec(tmp_path):
    with pytest.raises(ValueError, match=re.escape("topology spec 'random:k=50': cannot build for n=[20]: ") + ".*'k'"):
        topology_fn("random:k=50")([20])
    path = tmp_path / "k.toml"
    path.write_text('builder = "random"\n[params]\nk = 5\n')
    with pytest.raises(ValueError, match=re.escape(f"{path}: cannot build for n=[3]: ") + ".*'k'"):
        topology_fn(str(path))([3])
    catalogue_file = str(T.catalogue()["random"])
    with pytest.raises(ValueError, match=re.escape(catalogue_file) + ".*'k'"):
        topology_fn("random", small=True)([2])


@pytest.mark.parametrize("spec", ["graphs\\causal", ".\\full", "sub/causal", "./full", "causal.toml"])
def test_a_separator_or_toml_suffix_makes_a_path_never_a_catalogue_name(spec):
    from gnn_transformer.topology.specs import is_path

    assert is_path(spec)
    with pytest.raises(ValueError, match="No spec file"):  # looked up as a file, not in the catalogue
        T.read_spec(spec)


def test_a_bare_name_is_a_catalogue_name():
    from gnn_transformer.topology.specs import is_path

    assert not is_path("causal")
    assert T.read_spec("causal").path == T.catalogue()["causal"]
