"""The one configuration: built once, validated when made, rendered to the
plugin's keys and parsed back into the same object."""
from __future__ import annotations

import dataclasses
import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nbdloop.engine import config
from nbdloop.engine.config import ConfigError, Export, Server

texts = st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)))
exports = st.builds(
    Export, image=texts.filter(bool),
    mode=st.sampled_from(config.MODES), readonly=st.booleans(),
    segment_size=st.integers(1, 4096).map(lambda n: n * 4096),
    name=texts, fd=st.none() | st.integers(0, 1 << 20))
server_settings = dict(
    placement=st.sampled_from(config.PLACEMENTS), mlock=st.booleans(),
    stats_file=st.none() | st.just("/run/stats.json"), shared=st.booleans(),
    outlive_parent=st.booleans())
servers = (st.builds(Server, exports=st.tuples(exports), **server_settings)
           | st.builds(Server, exports_dir=texts.filter(bool), **server_settings))


def pairs(keys: list[str]) -> list[tuple[str, str]]:
    """What nbdkit hands the plugin for ``key=value`` arguments."""
    return [tuple(k.split("=", 1)) for k in keys]


@given(servers)
def test_the_plugin_parses_back_what_was_rendered(server):
    back = config.from_plugin_keys(pairs(config.plugin_keys(server)))
    # The plugin's keys hold the export and the engine's settings; nbdkit's
    # own (threads, socket, ...) are on nbdkit's command line instead.
    assert back == Server(exports=server.exports, exports_dir=server.exports_dir,
                          placement=server.placement, mlock=server.mlock,
                          stats_file=server.stats_file, shared=server.shared,
                          outlive_parent=server.outlive_parent)


def test_several_exports_each_take_the_keys_after_their_file():
    server = Server(exports=(Export("/a", mode="buffered", name="a"),
                             Export("/b", readonly=True, name="b")))
    keys = config.plugin_keys(server)
    assert keys == ["file=/a", "mode=buffered", "export-name=a",
                    "file=/b", "mode=direct", "readonly=1", "export-name=b"]
    assert config.from_plugin_keys(pairs(keys)) == server


def test_defaults_are_not_rendered():
    assert config.plugin_keys(Server(exports=(Export("/img"),))) == ["file=/img", "mode=direct"]


def test_an_exports_directory_is_one_key():
    server = Server(exports_dir="/run/exports", placement="off")
    keys = config.plugin_keys(server)
    assert keys == ["exports-dir=/run/exports", "placement=off"]
    assert config.from_plugin_keys(pairs(keys)) == server
    assert server.exports == ()


def test_the_plugin_takes_sizes_as_users_write_them():
    server = config.from_plugin_keys([("file", "/i"), ("segment-size", "1M")])
    assert server.export.segment_size == 1 << 20


@pytest.mark.parametrize("keys, phrase", [
    ([], "file parameter is required"),
    ([("placement", "off")], "file parameter is required: file=IMAGE (or exports-dir=DIR)"),
    ([("file", "/i"), ("exports-dir", "/e")], "not both"),
    ([("exports-dir", "")], "the exports directory has no name"),
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
    with pytest.raises(ConfigError, match="needs an export or an exports directory"):
        Server(exports=())
    with pytest.raises(ConfigError, match="not both"):
        Server(exports=(export,), exports_dir="/exports")
    with pytest.raises(ConfigError, match="negative"):
        Export("/img", offset=-1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        export.mode = "buffered"


def test_a_slice_is_served_by_nbdkit_not_the_plugin():
    server = Server(exports=(Export("/img", offset=4096, length=8192),))
    assert server.export.sliced
    assert config.plugin_keys(server) == ["file=/img", "mode=direct"]
    assert not Export("/img").sliced


# ---- an export of an exports directory ------------------------------------------------

definitions = st.builds(
    Export, image=texts.map(lambda t: "/" + t),
    mode=st.sampled_from(config.MODES), readonly=st.booleans(),
    segment_size=st.integers(1, 4096).map(lambda n: n * 4096),
    offset=st.integers(0, 1 << 62), length=st.integers(0, 1 << 62),
    name=texts, fd=st.none() | st.integers(0, 1 << 20))


@given(definitions)
def test_an_export_definition_reads_back_as_written(export):
    text = config.export_json(export)
    assert "\n" not in text
    # The name is the definition file's; a descriptor is one the server
    # inherits under that number (a user's image).
    assert config.export_from_json(text) == dataclasses.replace(export, name="")
    assert config.export_from_json(text.encode()) == config.export_from_json(text)


def test_an_export_definition_holds_its_fields_and_no_more():
    export = Export("/img", mode="buffered", readonly=True, segment_size=1 << 20,
                    name="disk", offset=4096, length=8192, fd=3)
    assert json.loads(config.export_json(export)) == {
        "image": "/img", "mode": "buffered", "readonly": True, "segment_size": 1 << 20,
        "offset": 4096, "length": 8192, "fd": 3}
    assert config.export_from_json('{"image": "/img"}') == Export("/img")


@pytest.mark.parametrize("text, phrase", [
    ("", "not JSON: Expecting value"),
    (b"\xff\xfe\x00garbage", "not JSON"),
    ("[" * 100_000, "not JSON"),
    ('["/img"]', 'a JSON object, not ["/img"]'),
    ('{"image": "/img", "colour": "red"}', 'no key "colour"'),
    ('{"image": "/img", "fd": "3"}', 'fd must be an integer'),
    ('{"image": "/img", "name": "disk"}', 'no key "name"'),
    ('{"mode": "direct"}', "needs its image"),
    ('{"image": 7}', "image must be a string, not 7"),
    ('{"image": "/img", "readonly": 1}', "readonly must be true or false, not 1"),
    ('{"image": "/img", "offset": true}', "offset must be an integer, not true"),
    ('{"image": "/img", "offset": 4096.0}', "offset must be an integer, not 4096.0"),
    ('{"image": "/img", "segment_size": "1M"}', 'segment_size must be an integer, not "1M"'),
    ('{"image": "/img", "length": null}', "length must be an integer, not null"),
    ('{"image": "img"}', "must be an absolute path, not 'img'"),
    ('{"image": "/img", "mode": "fast"}', "mode must be direct or buffered"),
    ('{"image": "/img", "offset": -4096}', "cannot be negative"),
    ('{"image": "/img", "segment_size": 1000}', "not a multiple of 4K"),
])
def test_a_bad_export_definition_is_a_one_line_error(text, phrase):
    with pytest.raises(ConfigError) as e:
        config.export_from_json(text)
    assert phrase in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_a_relative_image_is_never_written():
    with pytest.raises(ConfigError, match="absolute path"):
        config.export_json(Export("disk.img"))


@pytest.mark.parametrize("name", ["a", "disk0", "vm-1:root.img", "A_b", "9" * 64])
def test_export_names(name):
    assert config.check_export_name(name) == name


@pytest.mark.parametrize("name", ["", ".", "..", "../disk", "a/b", "/a", "-a", "_a", ".a",
                                  ":a", "a b", "a\n", "disk\0", "é", "9" * 65])
def test_names_that_are_no_export_names(name):
    with pytest.raises(ConfigError) as e:
        config.check_export_name(name)
    assert "is not an export name" in str(e.value) and "\n" not in str(e.value)
