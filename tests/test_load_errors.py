"""Checkpoints under bad files and arguments: MultiScaleResampler.from_pretrained / from_state_dict /
save_pretrained and the port's load_port_checkpoint / save_port_checkpoint / CLI. Each damaged file,
disagreeing config, non-finite weight or unusable device is refused with a ValueError or TypeError
naming the file (or argument), what was found and what was expected; the CLI says it in one line."""

import io
import json
import os
import pickle
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from cos_kernels import MultiScaleResampler
from cos_kernels.port import config_from_port, load_port_checkpoint, main, save_port_checkpoint
from cos_kernels.resampler import check_device
from test_port import port_config_80, random_port_state
from test_resampler import randomize_, small_config

WEIGHTS, CONFIG = "model.safetensors", "config.json"


@pytest.fixture
def saved(tmp_path):
    """A save_pretrained directory of small_config()."""
    randomize_(MultiScaleResampler(small_config(), backend="torch")).save_pretrained(tmp_path / "saved")
    return tmp_path / "saved"


def rewrite_weights(directory, edit_state=None, edit_metadata=None):
    """Rewrite directory's model.safetensors with its tensors and metadata edited in place."""
    path = directory / WEIGHTS
    state = load_file(path)
    with open(path, "rb") as f:  # the metadata: the header's __metadata__
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    metadata = header.get("__metadata__", {})
    (edit_state or (lambda s: None))(state)
    (edit_metadata or (lambda m: None))(metadata)
    save_file(state, path, metadata=metadata)


def edit_config(directory, **fields):
    config = json.loads((directory / CONFIG).read_text())
    (directory / CONFIG).write_text(json.dumps({**config, **fields}))


def torch_saved_bytes(obj) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


# ---- damaged files ------------------------------------------------------------------------------
DAMAGED = [  # (file, its new bytes (from the good ones), what the message says after the path)
    (WEIGHTS, lambda good: b"", r" \(0 bytes\) is not a readable safetensors file \(.*header too small\): "
                                r"expected the weights MultiScaleResampler.save_pretrained writes"),
    (WEIGHTS, lambda good: good[: len(good) // 2], r" \(\d+ bytes\) is not a readable safetensors file \(.*incomplete "
                                                   r"metadata.*\): expected the weights"),
    (WEIGHTS, lambda good: os.urandom(64) * 16, r" \(1024 bytes\) is not a readable safetensors file"),
    (WEIGHTS, lambda good: torch_saved_bytes({"queries.0": torch.ones(3)}), r" \(\d+ bytes\) is not a readable safetensors"),
    (CONFIG, lambda good: b"", r" is empty: expected a JSON object of CoSConfig fields"),
    (CONFIG, lambda good: good[: len(good) // 2], r" is malformed JSON \(.*\): expected a JSON object of CoSConfig fields"),
    (CONFIG, lambda good: good.replace(b"}", b", }"), r" is malformed JSON \(Expecting property name.*\): expected"),
    (CONFIG, lambda good: '{"grid": "é"}'.encode("latin-1"), r" is not UTF-8 text \(.*\): expected a JSON object of CoSConfig"),
    (CONFIG, lambda good: b"null", r" must be a JSON object \{\.\.\.\} of CoSConfig fields, got NoneType 'null'"),
    (CONFIG, lambda good: b"[4, 6]", r" must be a JSON object \{\.\.\.\} of CoSConfig fields, got list '\[4, 6\]'"),
    (CONFIG, lambda good: good.replace(b'"dim": 32', b'"dim": 0'), r": CoSConfig.dim must be a positive integer, got 0"),
]


@pytest.mark.parametrize("name, damage, match", DAMAGED, ids=[f"{c[0]}-{i}" for i, c in enumerate(DAMAGED)])
def test_a_damaged_file_is_named_with_what_it_holds(saved, name, damage, match):
    (saved / name).write_bytes(damage((saved / name).read_bytes()))
    with pytest.raises(ValueError, match=re.escape(str(saved / name)) + match) as info:
        MultiScaleResampler.from_pretrained(saved)
    assert "trainer.pt" not in str(info.value)  # never taken for a broken cos-train checkpoint


BAD_METADATA = [
    ("layout", "{x", r"metadata 'layout' = '\{x' is not what save_pretrained records \(Expecting property name"),
    ("layout", '{"grid": 4}', r"metadata 'layout' = .* \(expected a JSON list of a layout's integers .*got dict\)"),
    ("layout", "[4, 6, 1]", r"metadata 'layout' = '\[4, 6, 1\]' .*\(a layout spec is \(GH, GW, wh, ww, n, \.\.\.\), got"),
    ("layout", '["4", 6, 4, 6, 3]', r"metadata 'layout' .*\(layout spec\[0\] must be an integer, got '4' \(str\)"),
    ("config", "not json", r"metadata 'config' = 'not json' .*\(the entry is malformed JSON"),
    ("config", '{"dim": "32"}', r"metadata 'config' .*\(the entry: CoSConfig.dim must be a positive integer, got '32' \(str\)\)"),
]


@pytest.mark.parametrize("key, value, match", BAD_METADATA)
def test_bad_metadata_is_named_with_its_key(saved, key, value, match):
    rewrite_weights(saved, edit_metadata=lambda m: m.update({key: value}))
    with pytest.raises(ValueError, match=re.escape(f"{saved / WEIGHTS}: ") + match):
        MultiScaleResampler.from_pretrained(saved)


@pytest.mark.parametrize("dtype", [torch.int64, torch.int8, torch.bool])
def test_weights_of_a_non_floating_dtype_are_refused(saved, dtype):
    rewrite_weights(saved, edit_state=lambda s: s.update({"proj_out.bias": s["proj_out.bias"].to(dtype)}))
    with pytest.raises(ValueError, match=re.escape(f"{saved / WEIGHTS}: tensor 'proj_out.bias' has dtype {dtype}; "
                                                   f"expected a floating-point dtype")):
        MultiScaleResampler.from_pretrained(saved)


# ---- a config.json disagreeing with the weights -------------------------------------------------
RECORDED = [  # fields the shapes do not show: compared with the config recorded in the metadata
    (dict(num_heads=2), r"num_heads = 2 but the weights in .* imply num_heads = 4 \(as recorded in their 'config' metadata\)"),
    (dict(num_heads=8), r"num_heads = 8 but .* imply num_heads = 4"),
    (dict(norm_eps=1e-6), r"norm_eps = 1e-06 but .* imply norm_eps = 1e-05"),
    (dict(mlp_ratio=2.01), r"mlp_ratio = 2.01 but .* imply mlp_ratio = 2.0"),
]
SHAPED = [  # fields the shapes show: compared with them, also in files without the recorded config
    (dict(dim=48), r"dim = 48 but the weights in .* imply dim = 32 \('queries.0' has shape \(3, 32\)\)"),
    (dict(vision_dim=16), r"vision_dim = 16 but .* imply vision_dim = 24 \('levels.0.0.to_k.weight' has shape \(32, 24\)\)"),
    (dict(llm_dim=8), r"llm_dim = 8 but .* imply llm_dim = 40 \('proj_out.weight' has shape \(40, 32\)\)"),
    (dict(mlp_ratio=4.0), r"mlp_ratio = 4.0 gives hidden_dim = int\(dim \* mlp_ratio\) = 128 but .* imply hidden_dim = 64 "
                          r"\('levels.0.0.fc1.weight' has shape \(64, 32\)\)"),
    (dict(num_levels=1), r"num_levels = 1 but .* imply num_levels = 2 \(its tensors name levels 0, 1\)"),
]


@pytest.mark.parametrize("fields, match", RECORDED + SHAPED)
def test_a_config_field_disagreeing_with_the_weights_is_refused(saved, fields, match):
    edit_config(saved, **fields)
    with pytest.raises(ValueError, match=re.escape(f"{saved / CONFIG}: ") + match):
        MultiScaleResampler.from_pretrained(saved)


@pytest.mark.parametrize("fields, match", SHAPED + [
    (dict(queries=[3, 24]), r"queries = \[3, 24\] but .* imply queries = \[3, 12\] \('queries.0' has shape \(3, 32\), "
                            r"'queries.1' has shape \(12, 32\)\)"),
])
def test_files_without_the_recorded_config_are_checked_against_their_shapes(saved, fields, match):
    """Files save_pretrained wrote before it recorded the config (and before the layout)."""
    rewrite_weights(saved, edit_metadata=lambda m: [m.pop("config"), m.pop("layout")])
    MultiScaleResampler.from_pretrained(saved)  # unchanged, it loads
    edit_config(saved, **fields)
    with pytest.raises(ValueError, match=re.escape(f"{saved / CONFIG}: ") + match):
        MultiScaleResampler.from_pretrained(saved)


def test_fields_the_weights_do_not_depend_on_may_change(saved):
    edit_config(saved, drop_cls=False, patch_size=16, init_std=0.5, concat_levels=True)
    loaded = MultiScaleResampler.from_pretrained(saved)
    assert (loaded.config.drop_cls, loaded.config.patch_size) == (False, 16)


# ---- non-finite weights -------------------------------------------------------------------------
def poison(state):
    state["queries.1"][0, :2] = float("nan")
    state["proj_out.bias"][3] = float("inf")


def test_non_finite_weights_are_refused_unless_allowed(saved):
    rewrite_weights(saved, edit_state=poison)
    want = (f"{saved / WEIGHTS} holds NaN or Inf in 2 tensors: 'queries.1' (2 of its 384 values), 'proj_out.bias' "
            f"(1 of its 40 values); expected finite weights (pass allow_nonfinite=True to load them anyway)")
    with pytest.raises(ValueError, match=re.escape(want)):
        MultiScaleResampler.from_pretrained(saved)
    loaded = MultiScaleResampler.from_pretrained(saved, allow_nonfinite=True)
    assert loaded.queries[1][0, :2].isnan().all() and loaded.proj_out.bias[3].isinf()
    with pytest.raises(TypeError, match=r"allow_nonfinite must be a bool \(True or False\), got 'yes' \(str\)"):
        MultiScaleResampler.from_pretrained(saved, allow_nonfinite="yes")


def test_from_state_dict_refuses_non_finite_weights():
    state = MultiScaleResampler(small_config(), backend="torch").state_dict()
    poison(state)
    with pytest.raises(ValueError, match=r"^the state dict holds NaN or Inf in 2 tensors: 'queries.1'"):
        MultiScaleResampler.from_state_dict(small_config(), state)
    assert MultiScaleResampler.from_state_dict(small_config(), state, allow_nonfinite=True).proj_out.bias[3].isinf()


def port_key(name):
    return "model.mm_projector." + name


def test_the_port_refuses_non_finite_weights_by_their_port_names(tmp_path):
    pc = port_config_80()
    state = random_port_state(pc)
    state[port_key("cls_token_w8_q4")][0, 1, :3] = float("nan")
    with pytest.raises(ValueError, match=re.escape(
            "the port state dict holds NaN or Inf in 1 tensor: 'model.mm_projector.cls_token_w8_q4' (3 of its 256 "
            "values); expected finite weights (pass allow_nonfinite=True")):
        load_port_checkpoint(state, pc)
    torch.save(state, tmp_path / "mm_projector.bin")
    with pytest.raises(ValueError, match=re.escape(f"port checkpoint '{tmp_path / 'mm_projector.bin'}' holds NaN or Inf")):
        load_port_checkpoint(tmp_path / "mm_projector.bin", pc)
    assert load_port_checkpoint(state, pc, allow_nonfinite=True).queries[0][1, :3].isnan().all()


def test_the_port_cli_refuses_non_finite_weights_unless_allowed(tmp_path, capsys):
    pc = port_config_80()
    state = random_port_state(pc)
    state[port_key("out_proj.bias")][0] = float("inf")
    torch.save(state, tmp_path / "mm_projector.bin")
    (tmp_path / "pc.json").write_text(json.dumps(pc))
    argv = ["to-cos", str(tmp_path / "mm_projector.bin"), str(tmp_path / "pc.json"), str(tmp_path / "cos")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"cos_kernels\.port: error: port checkpoint .* holds NaN or Inf in 1 tensor: "
                        r"'model\.mm_projector\.out_proj\.bias' .*\n", err), err
    assert main([*argv, "--allow-nonfinite"]) == 0
    back = ["to-port", str(tmp_path / "cos"), str(tmp_path / "port"), "--feature-levels", "15", "22"]
    assert main(back) == 2
    assert re.fullmatch(rf"cos_kernels\.port: error: {re.escape(str(tmp_path / 'cos' / WEIGHTS))} holds NaN or Inf .*\n",
                        capsys.readouterr().err)
    assert main([*back, "--allow-nonfinite"]) == 0


# ---- devices ------------------------------------------------------------------------------------
@pytest.fixture
def no_cuda(monkeypatch):
    """CUDA unavailable, also on a machine with a GPU."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.mark.parametrize("device", ["cuda", "cuda:1", torch.device("cuda", 0)])
def test_cuda_where_it_is_absent_is_refused_by_every_loader(saved, no_cuda, device):
    name = str(torch.device(device))
    want = rf"^device='{name}' but CUDA is not available here \(.*\): use device='cpu' or None$"
    with pytest.raises(ValueError, match=want):
        check_device(device)
    with pytest.raises(ValueError, match=want):
        MultiScaleResampler.from_pretrained(saved, device=device)
    with pytest.raises(ValueError, match=want):
        MultiScaleResampler.from_state_dict(small_config(), MultiScaleResampler(small_config()).state_dict(),
                                            device=device)
    with pytest.raises(ValueError, match=want):
        load_port_checkpoint(random_port_state(port_config_80()), port_config_80(), device=device)


def test_the_cuda_message_says_why(monkeypatch, no_cuda):
    monkeypatch.setattr(torch.version, "cuda", None)
    with pytest.raises(ValueError, match=rf"\(torch {re.escape(torch.__version__)} is built without CUDA\)"):
        check_device("cuda")
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    with pytest.raises(ValueError, match=r"\(no GPU is visible to torch .* \(CUDA 12\.8\)\)"):
        check_device("cuda", name="--device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    with pytest.raises(ValueError, match=r"^device='cuda:2' but only 2 CUDA device\(s\) are visible \(cuda:0\.\.cuda:1\)$"):
        check_device("cuda:2")
    assert check_device("cuda:1") == torch.device("cuda", 1) and check_device(None) == torch.device("cpu")
    with pytest.raises(TypeError, match=r"device must be a torch.device, a str such as 'cuda:0', or None, got 3\.5"):
        check_device(3.5)


# ---- the port's files ---------------------------------------------------------------------------
class _RunsACommand:
    def __reduce__(self):
        return os.system, ("true",)


def _good_bin():
    return torch_saved_bytes(random_port_state(port_config_80()))


PORT_FILES = [  # (file name, its bytes, the message after "port checkpoint '<path>'")
    ("mm_projector.bin", lambda: torch_saved_bytes({"x": _RunsACommand()}),
     r" \(\d+ bytes\) cannot be read by torch.load\(weights_only=True\) \(UnpicklingError: .*GLOBAL posix.system.* "
     r"\(a pickle of objects other than tensors is refused, as loading it could run arbitrary code\)\): expected a "
     r"state dict of tensors"),
    ("mm_projector.bin", lambda: b"", r" \(0 bytes\) cannot be read by torch.load\(weights_only=True\) \(EOFError: "
                                     r"unexpected end of file\): expected a state dict of tensors"),
    ("mm_projector.bin", lambda: _good_bin()[:300], r" \(300 bytes\) cannot be read by torch.load.*\(RuntimeError: "
                                                   r"PytorchStreamReader failed"),
    ("mm_projector.pt", lambda: pickle.dumps([1, 2], protocol=2), r" \(\d+ bytes\) cannot be read by torch.load"),
]


@pytest.mark.parametrize("name, data, match", PORT_FILES)
def test_an_unreadable_port_checkpoint_is_named(tmp_path, capsys, name, data, match):
    path = tmp_path / name
    path.write_bytes(data())
    with pytest.raises(ValueError, match=re.escape(f"port checkpoint '{path}'") + match):
        load_port_checkpoint(path, port_config_80())
    (tmp_path / "pc.json").write_text(json.dumps(port_config_80()))
    assert main(["to-cos", str(path), str(tmp_path / "pc.json"), str(tmp_path / "cos")]) == 2
    err = capsys.readouterr().err
    assert re.fullmatch(r"cos_kernels\.port: error: port checkpoint .* cannot be read by torch\.load[^\n]*\n", err), err


def test_a_truncated_safetensors_port_checkpoint_is_named(tmp_path):
    path = tmp_path / "mm_projector.safetensors"
    save_file(random_port_state(port_config_80()), path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=re.escape(str(path)) + r" \(\d+ bytes\) is not a readable safetensors file "
                                         r"\(.*incomplete metadata.*\): expected a state dict of tensors"):
        load_port_checkpoint(path, port_config_80())


def test_a_directory_given_as_the_port_checkpoint_is_named(tmp_path, capsys):
    (tmp_path / "llava").mkdir()
    want = (f"port checkpoint '{tmp_path / 'llava'}' is a directory: expected a file holding a state dict of tensors "
            f"(.bin, .pt, .pth: torch.save; or .safetensors), e.g. '{tmp_path / 'llava' / 'mm_projector.bin'}'")
    with pytest.raises(ValueError, match=re.escape(want)):
        load_port_checkpoint(tmp_path / "llava", port_config_80())
    (tmp_path / "pc.json").write_text(json.dumps(port_config_80()))
    assert main(["to-cos", str(tmp_path / "llava"), str(tmp_path / "pc.json"), str(tmp_path / "cos")]) == 2
    assert capsys.readouterr().err == f"cos_kernels.port: error: {want}\n"


def test_bytes_paths_are_accepted(tmp_path):
    pc = port_config_80()
    state = random_port_state(pc)
    torch.save(state, tmp_path / "mm_projector.bin")
    loaded = load_port_checkpoint(os.fsencode(tmp_path / "mm_projector.bin"), pc)
    save_port_checkpoint(loaded, os.fsencode(tmp_path / "out" / "mm_projector.bin"), [15, 22])
    assert torch.equal(torch.load(tmp_path / "out" / "mm_projector.bin")[port_key("ln_out.bias")],
                       state[port_key("ln_out.bias")])
    loaded.save_pretrained(os.fsencode(tmp_path / "cos"))
    assert MultiScaleResampler.from_pretrained(os.fsencode(tmp_path / "cos")).config == loaded.config
    with pytest.raises(TypeError, match=r"path_or_state must be a path \(str, bytes or os.PathLike\) or a port state "
                                        r"dict, got int"):
        load_port_checkpoint(3, pc)


def test_a_port_config_file_that_is_not_an_object_is_named(tmp_path, capsys):
    torch.save(random_port_state(port_config_80()), tmp_path / "mm_projector.bin")
    (tmp_path / "pc.json").write_text("null")
    assert main(["to-cos", str(tmp_path / "mm_projector.bin"), str(tmp_path / "pc.json"), str(tmp_path / "cos")]) == 2
    assert capsys.readouterr().err == (f"cos_kernels.port: error: {tmp_path / 'pc.json'}: expected a JSON object of the "
                                       f"cos_* keys, got NoneType\n")


# ---- saving weights that are not there ----------------------------------------------------------
def test_saving_a_resampler_on_the_meta_device_is_refused(tmp_path):
    config, _ = config_from_port(port_config_80())
    with torch.device("meta"):
        resampler = MultiScaleResampler(config, backend="torch")
    want = (r"cannot save this MultiScaleResampler: its weights are on the meta device, not materialised \(\d+ of \d+ "
            r"tensors, e.g. 'queries.0'\); load them .* or initialise them \(resampler.to_empty\(device='cpu'\) then "
            r"resampler.reset_parameters\(\)\) first")
    with pytest.raises(ValueError, match=want):
        resampler.save_pretrained(tmp_path / "cos")
    with pytest.raises(ValueError, match=want):
        save_port_checkpoint(resampler, tmp_path / "port" / "mm_projector.bin", [15, 22])
    assert not (tmp_path / "cos" / WEIGHTS).exists() and not (tmp_path / "port").exists()
    resampler.to_empty(device="cpu").reset_parameters()  # the remedy the message gives
    resampler.save_pretrained(tmp_path / "cos")
    save_port_checkpoint(resampler, tmp_path / "port" / "mm_projector.bin", [15, 22])
