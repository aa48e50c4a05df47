"""The one configuration: built once, validated when made, rendered to the
plugin's keys and parsed back into the same object."""
from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdloop.engine import config
from nbdloop.engine.config import ConfigError, Export, Server

exports = st.builds(
    Export,
    image=st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)),
                  min_size=1),
    mode=st.sampled_from(config.MODES), readonly=st.booleans(),
    segment_size=st.integers(1, 4096).map(lambda n: n * 4096),
    name=st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",))),
    fd=st.none() | st.integers(0, 1 << 20))
servers = st.builds(
    Server, exports=st.tuples(exports),
    placement=st.sampled_from(config.PLACEMENTS), mlock=st.booleans(),
    stats_file=st.none() | st.just("/run/stats.json"), shared=st.booleans(),
    outlive_parent=st.booleans())


def pairs(keys: list[str]) -> list[tuple[str, str]]:
    """What nbdkit hands the plugin for ``key=value`` arguments."""
    return [tuple(k.split("=", 1)) for k in keys]


@given(servers)
def test_the_plugin_parses_back_what_was_rendered(server):
    back = config.from_plugin_keys(pairs(config.plugin_keys(server)))
    # The plugin's keys hold the export and the engine's settings; nbdkit's
    # own (threads, socket, ...) are on nbdkit's command line instead.
    assert back == Server(exports=server.exports, placement=server.placement,
                          mlock=server.mlock, stats_file=server.stats_file,
                          shared=server.shared, outlive_parent=server.outlive_parent)


def test_several_exports_each_take_the_keys_after_their_file():
    server = Server(exports=(Export("/a", mode="buffered", name="a"),
                             Export("/b", readonly=True, name="b")))
    keys = config.plugin_keys(server)
    assert keys == ["file=/a", "mode=buffered", "export-name=a",
                    "file=/b", "mode=direct", "readonly=1", "export-name=b"]
    assert config.from_plugin_keys(pairs(keys)) == server


def test_defaults_are_not_rendered():
    assert config.plugin_keys(Server(exports=(Export("/img"),))) == ["file=/img", "mode=direct"]


def test_the_plugin_takes_sizes_as_users_write_them():
    server = config.from_plugin_keys([("file", "/i"), ("segment-size", "1M")])
    assert server.export.segment_size == 1 << 20


@pytest.mark.parametrize("keys, phrase", [
    ([], "file parameter is required"),
    ([("mode", "direct")], "mode= comes before file="),
    ([("file", "/i"), ("colour", "red")], "unknown parameter 'colour'"),
    ([("file", "/i"), ("readonly", "maybe")], "readonly: 'maybe' is not a boolean"),
    ([("file", "/i"), ("fd", "three")], "fd: 'three' is not a number"),
    ([("file", "/i"), ("mode", "fast")], "mode must be direct or buffered"),
    ([("file", "/i"), ("placement", "auto")], "placement must be irq or off"),
    ([("file", "/i"), ("segment-size", "1000")], "not a multiple of 4K"),
    ([("file", "/i"), ("segment-size", "32M")], "between 4K and 16M"),
    ([("file", "/i"), ("file", "/i")], "same name"),
])
def test_bad_keys_are_one_line_errors(keys, phrase):
    with pytest.raises(ConfigError) as e:
        config.from_plugin_keys(keys)
    assert phrase in str(e.value) and "\n" not in str(e.value)


def test_a_server_is_checked_when_made():
    export = Export("/img")
    with pytest.raises(ConfigError, match="not both"):
        Server(exports=(export,), socket="/s", port=10809)
    with pytest.raises(ConfigError, match="threads"):
        Server(exports=(export,), threads=0)
    with pytest.raises(ConfigError, match="needs an export"):
        Server(exports=())
    with pytest.raises(ConfigError, match="negative"):
        Export("/img", offset=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        export.mode = "buffered"


def test_a_slice_is_served_by_nbdkit_not_the_plugin():
    server = Server(exports=(Export("/img", offset=4096, length=8192),))
    assert server.export.sliced
    assert config.plugin_keys(server) == ["file=/img", "mode=direct"]
    assert not Export("/img").sliced
