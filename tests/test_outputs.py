"""File-reference rewriting: every reference round-trips, and none can be made to point elsewhere."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from proxy.outputs import client_filename, make_ref, ref_of, rewrite_outputs, rewrite_ui_output
from proxy.store import OutputRef

names = st.text(alphabet=st.characters(blacklist_categories=("Cs",), blacklist_characters="/\\\0"), min_size=1,
                max_size=40)


@given(names, st.sampled_from(["", ".png", ".webp", ".mp4"]))
def test_reference_round_trips(stem: str, ext: str) -> None:
    target = OutputRef(backend="b", filename=stem + ext, subfolder="", type="output")
    ref = make_ref(target)
    shown = client_filename(target.filename, ref)
    assert ref_of(shown) == ref
    assert ref_of(shown + " [output]") == ref


@given(names)
def test_plain_names_carry_no_reference(name: str) -> None:
    assert ref_of("ComfyUI_00001_.png") is None
    if "~" not in name:
        assert ref_of(name) is None


def test_reference_depends_on_backend_and_tenant() -> None:
    base = dict(filename="ComfyUI_00001_.png", subfolder="", type="output", prompt_id="p")
    refs = {make_ref(OutputRef(backend=b, tenant=t, **base)) for b in ("x", "y") for t in ("t1", "t2")}
    assert len(refs) == 4


def test_rewrite_keeps_unknown_keys_and_all_lists() -> None:
    ui = {"images": [{"filename": "a.png", "subfolder": "s", "type": "output"}],
          "gifs": [{"filename": "v.mp4", "subfolder": "", "type": "output", "format": "video/h264-mp4"}],
          "text": ["hello"], "animated": [False]}
    out, refs = rewrite_ui_output(ui, backend="b", tenant="t", prompt_id="p")
    assert out["text"] == ["hello"] and out["animated"] == [False]
    assert out["gifs"][0]["format"] == "video/h264-mp4" and out["images"][0]["subfolder"] == "s"
    assert {r.filename for r in refs.values()} == {"a.png", "v.mp4"}
    assert all(ref_of(item["filename"]) in refs for item in out["images"] + out["gifs"])
    hist, refs2 = rewrite_outputs({"9": ui}, backend="b", tenant="t", prompt_id="p")
    assert hist["9"] == out and refs2 == refs
