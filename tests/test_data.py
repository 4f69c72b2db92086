"""Caption data: the synthetic scenes, the LLaVA pre-training reader, the resumable sharded sampler."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from cos_kernels.mllm import LlavaPretrainDataset, SyntheticCaptions, make_scene, render_scene
from cos_kernels.mllm.synthetic import BACKGROUNDS, COLOURS, POSITIONS
from cos_kernels.train.data import EpochSampler


def test_synthetic_data_is_deterministic_by_seed():
    a, b, other = SyntheticCaptions(8, 32, seed=1), SyntheticCaptions(8, 32, seed=1), SyntheticCaptions(8, 32, seed=2)
    assert [a[i]["caption"] for i in range(8)] == [b[i]["caption"] for i in range(8)]
    assert all(torch.equal(a[i]["pixel_values"], b[i]["pixel_values"]) for i in range(8))
    assert [a.caption(i) for i in range(8)] != [other.caption(i) for i in range(8)]
    with pytest.raises(IndexError):
        a[8]


@pytest.mark.parametrize("size", [64, 224])
def test_synthetic_images_show_what_the_caption_says(size):
    """Read the caption back off the image: background colour in a corner; each named shape's colour
    at its centre, in the named cell of the 3x3 layout."""
    for index in range(20):
        scene = make_scene(0, index)
        image = render_scene(scene, size)
        caption = scene.caption
        count = caption.split(" ")[0]
        assert count == ["one", "two", "three"][len(scene.shapes) - 1]
        bg = caption.split(" on a ")[1].split(" background")[0]
        torch.testing.assert_close(image[:, 0, 0], torch.tensor(BACKGROUNDS[bg]))
        for shape, part in zip(scene.shapes, caption.split(": ")[1].rstrip(".").split(", ")):
            colour, kind, position = part[2:].split(" ", 2)
            assert kind == shape.kind and position == f"at {POSITIONS[shape.cell]}"
            row, col = min(int(shape.y * 3), 2), min(int(shape.x * 3), 2)
            assert POSITIONS[row * 3 + col] == position[3:]
            y, x = int(shape.y * size), int(shape.x * size)
            torch.testing.assert_close(image[:, y, x], torch.tensor(COLOURS[colour]))


def test_scene_fields_span_the_captions_content_words():
    """Scene.fields against a plain parse of the caption: count, background, then colour, kind and
    position of each shape, in order, each span holding exactly that word."""
    for index in range(30):
        scene = make_scene(3, index)
        caption = scene.caption
        head, body = caption.rstrip(".").split(": ")
        count, background = head.split(" on a ")
        expected = [("count", count), ("background", background.removesuffix(" background"))]
        for part in body.split(", "):
            colour, kind, position = part.removeprefix("a ").split(" ", 2)
            expected += [("colour", colour), ("kind", kind), ("position", position.removeprefix("at "))]
        assert [(f, caption[a:b]) for f, a, b in scene.fields] == expected
        assert SyntheticCaptions(40, 16, seed=3).fields(index) == scene.fields


def write_llava_folder(root, corrupt: int = 1, missing: int = 1, good: int = 3):
    images = root / "images"
    images.mkdir(parents=True)
    entries = []
    for i in range(good + corrupt + missing):
        name = f"sub/{i:03d}.png"
        (images / "sub").mkdir(exist_ok=True)
        if i < good:
            Image.fromarray(np.full((40, 60, 3), 40 * i, dtype=np.uint8)).save(images / name)
        elif i < good + corrupt:
            (images / name).write_bytes(b"\x89PNG not really an image")
        entries.append({"id": f"{i:03d}", "image": name, "conversations": [
            {"from": "human", "value": "<image>\nDescribe the image."}, {"from": "gpt", "value": f"caption {i} "}]})
    (root / "chat.json").write_text(json.dumps(entries))
    return root / "chat.json", images


def test_llava_reader_skips_and_counts_unreadable_images(tmp_path):
    json_path, images = write_llava_folder(tmp_path)
    data = LlavaPretrainDataset(json_path, images, image_size=32)
    assert len(data) == 5 and data.caption(4) == "caption 4"
    items = [data[i] for i in range(len(data))]
    assert [it["id"] for it in items] == ["000", "001", "002", "000", "000"]  # unreadable ones replaced
    assert sorted(s for it in items for s in it["skipped"]) == ["003", "004", "004"]
    assert items[3]["skipped"] == ["003", "004"] and items[4]["skipped"] == ["004"]
    assert items[1]["caption"] == "caption 1" and items[1]["pixel_values"].shape == (3, 32, 32)
    # a 60x40 grey image: resized to 48x32, centre-cropped to 32x32, values in [0, 1]
    torch.testing.assert_close(items[2]["pixel_values"], torch.full((3, 32, 32), 80 / 255))


def test_llava_reader_rejects_malformed_files(tmp_path):
    (tmp_path / "bad.json").write_text('[{"id": "1", "image": "a.png", ')
    with pytest.raises(ValueError, match=r"bad.json is not valid JSON \(line 1"):
        LlavaPretrainDataset(tmp_path / "bad.json", tmp_path, 32)
    (tmp_path / "obj.json").write_text('{"id": "1"}')
    with pytest.raises(ValueError, match="must hold a non-empty JSON list"):
        LlavaPretrainDataset(tmp_path / "obj.json", tmp_path, 32)
    (tmp_path / "nogpt.json").write_text(json.dumps([{"id": "7", "image": "a.png", "conversations": [
        {"from": "human", "value": "hi"}]}]))
    with pytest.raises(ValueError, match=r"entry 0 \(id '7'\).*no 'gpt' turn"):
        LlavaPretrainDataset(tmp_path / "nogpt.json", tmp_path, 32)
    (tmp_path / "noimage.json").write_text(json.dumps([{"id": "8", "conversations": []}]))
    with pytest.raises(ValueError, match=r"lacks \['image'\]"):
        LlavaPretrainDataset(tmp_path / "noimage.json", tmp_path, 32)
    (tmp_path / "none.json").write_text(json.dumps([{"id": "1", "image": "a.png", "conversations": [
        {"from": "gpt", "value": "x"}]}]))
    with pytest.raises(ValueError, match="is not a directory"):
        LlavaPretrainDataset(tmp_path / "none.json", tmp_path / "nowhere", 32)
    with pytest.raises(RuntimeError, match="none of the 1 images"):
        LlavaPretrainDataset(tmp_path / "none.json", tmp_path, 32)[0]


def test_epoch_sampler_shards_ranks_and_resumes_mid_epoch():
    ranks = [EpochSampler(103, 4, seed=5, epoch=0, rank=r, world_size=3).indices for r in range(3)]
    assert all(len(r) == 32 for r in ranks)  # 103 // 3 // 4 * 4
    flat = sum(ranks, [])
    assert len(set(flat)) == 96 and set(flat) <= set(range(103))
    assert EpochSampler(103, 4, 5, 0, 1, 3, skip=8).indices == ranks[1][8:]
    assert EpochSampler(103, 4, 5, 1, 1, 3).indices != ranks[1]
    with pytest.raises(ValueError, match="fewer than one micro-batch"):
        EpochSampler(5, 4, 0, 0, 0, 2)
