"""Registry: names, errors, and the architectures behind each spec (tiny random-weight ones)."""
from __future__ import annotations

import pytest
import torch

import atomkit
from atomkit.errors import ModelNotFound, UnknownModel
from atomkit.models.registry import LoadOptions, get_spec, llama32_1b_config
from atomkit.models.weights import PAPER_WEIGHTS_ENV, paper_weights


def test_available_models_lists_real_and_tiny_specs():
    names = atomkit.available_models()
    assert names[:2] == ["default", "atom-paper"]
    assert {"tiny-default", "tiny-paper"} <= set(names)
    assert all(get_spec(n).test_only == n.startswith("tiny") for n in names)


def test_unknown_model_lists_valid_names():
    with pytest.raises(UnknownModel) as err:
        atomkit.Session("clip-l14-llama")
    msg = str(err.value)
    assert "clip-l14-llama" in msg
    for name in atomkit.available_models():
        assert name in msg


def test_unknown_module_name():
    with pytest.raises(ValueError, match="encoder"):
        get_spec("tiny-default").load("projector", LoadOptions())


def test_atom_paper_without_weights_says_what_to_supply(monkeypatch):
    monkeypatch.delenv(PAPER_WEIGHTS_ENV, raising=False)
    s = atomkit.Session("atom-paper", device="cpu")
    with pytest.raises(ModelNotFound) as err:
        s.get("encoder")
    msg = str(err.value)
    assert PAPER_WEIGHTS_ENV in msg and "--weights" in msg and "--random-weights" in msg
    assert "open_clip_vit_l14.safetensors" in msg and "llama-3.2-1b" in msg and "projector.safetensors" in msg
    assert s.loaded() == []


def test_atom_paper_weights_folder_missing_one_file(tmp_path):
    (tmp_path / "open_clip_vit_l14.safetensors").write_bytes(b"x")
    (tmp_path / "llama-3.2-1b").mkdir()
    (tmp_path / "llama-3.2-1b" / "config.json").write_text("{}")
    with pytest.raises(ModelNotFound) as err:
        paper_weights(tmp_path)
    assert str(tmp_path / "projector.safetensors") in str(err.value)
    (tmp_path / "projector.safetensors").write_bytes(b"x")
    assert set(paper_weights(tmp_path)) == {"clip", "llama", "projector"}


def test_llama32_1b_architecture_size():
    from transformers import LlamaForCausalLM

    with torch.device("meta"):
        lm = LlamaForCausalLM(llama32_1b_config())
    n = sum(p.numel() for p in lm.parameters())  # tied embeddings are counted once
    assert 1.23e9 < n < 1.25e9


def test_tiny_paper_visual_prefix_caption():
    """The visual-prefix path: projected frame features are spliced into the prompt embeddings."""
    # the exact engine: on the packed int4 engine these random weights give one caption for all four test inputs
    decode = atomkit.DecodeConfig(max_new_tokens=5, num_beams=2, backend="torch")
    with atomkit.Session("tiny-paper", device="cpu", decode=decode) as s:
        # seeded: with the global generator the frames (and whether two captions differ) depended on test order
        frames = torch.randint(0, 255, (1, 3, 6, 224, 224), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
        enc = s.encoder.encode(frames)
        assert enc.features.shape == (6, 32) and enc.concepts == []
        text = s.decoder.render(s.decoder.caption_messages(enc))
        emb = s.decoder.prefix_embeds(text, enc.features)
        n_text = s.decoder._ids(text.replace("<video>", "")).shape[1]
        assert emb.shape == (1, n_text + 6, 64)
        new = s.decoder.generate_ids(inputs_embeds=emb, max_new_tokens=5, num_beams=2, backend="torch")
        assert new.shape == (5,)  # random weights: exactly max_new_tokens, no early stop
        assert s.decoder.caption(enc, s.decode) == s.decoder.decode_ids(new)  # the caption path splices this prefix
        other = s.encoder.encode(torch.randint(0, 255, (1, 3, 6, 224, 224), dtype=torch.uint8,
                                               generator=torch.Generator().manual_seed(1)))
        assert s.decoder.caption(other, s.decode) != s.decoder.caption(enc, s.decode)  # other frames, other words


def test_tiny_default_encoder_concepts_are_imagenet_labels(tiny_session):
    frames = torch.randint(0, 255, (1, 3, 6, 224, 224), dtype=torch.uint8)
    enc = tiny_session.encoder.encode(frames)
    labels = set(atomkit.models.encoder.imagenet_labels())
    assert enc.features.shape == (6, 1280)
    assert len(enc.concepts) == 10 and all(c in labels for c, _ in enc.concepts)
    probs = [p for _, p in enc.concepts]
    assert probs == sorted(probs, reverse=True)


def test_encoder_rejects_wrong_frame_tensor(tiny_session):
    with pytest.raises(ValueError, match="uint8"):
        tiny_session.encoder.encode(torch.zeros(1, 3, 6, 224, 224))


def test_random_weights_are_written_in_the_user_layout_and_read_back(tmp_path):
    """atom-paper --random-weights writes its random modules once in the weights layout and then loads
    them from disk like real weights; here the same writer with the tiny paper modules."""
    from safetensors.torch import load_file
    from transformers import LlamaForCausalLM

    from atomkit.models.encoder import clip_vision
    from atomkit.models.registry import write_paper_layout

    spec = get_spec("tiny-paper")
    enc, dec = spec.load("encoder", LoadOptions()), spec.load("decoder", LoadOptions())
    files = paper_weights(write_paper_layout(tmp_path / "w", enc, dec))
    assert not list(tmp_path.glob("*.tmp*"))  # written atomically
    again = clip_vision("ViT-L-14", checkpoint=files["clip"],
                        vision_overrides=dict(width=64, layers=2, head_width=32, patch_size=32, embed_dim=32))
    for k, v in enc.visual.state_dict().items():
        assert torch.equal(again.visual.state_dict()[k], v), k
    lm = LlamaForCausalLM.from_pretrained(files["llama"], local_files_only=True)
    for k, v in dec.lm.state_dict().items():
        assert torch.equal(lm.state_dict()[k], v), k
    proj = load_file(str(files["projector"]))
    assert all(torch.equal(proj[k], v) for k, v in dec.projector.state_dict().items())


def _lite_with_batchnorm_statistics(variant: str):
    """The package's EfficientNet-Lite ``variant`` in eval mode, random weights (unit tests only), its BatchNorms
    given non-trivial statistics and affine maps, so that folding them is not the identity."""
    from efficientnet_lite_pytorch import EfficientNet

    torch.manual_seed(0)
    net = EfficientNet.from_name(f"efficientnet-{variant}").eval()
    for m in net.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return net


def test_batchnorm_folding_keeps_the_encoder_outputs():
    """EfficientNet-Lite0 (random weights, unit test only) with non-trivial BatchNorm statistics gives the
    same features and class probabilities after its BatchNorms are folded into the convolutions."""
    import copy

    from atomkit.models.encoder import EfficientNetEncoder, fold_batchnorm, imagenet_labels

    net = _lite_with_batchnorm_statistics("lite0")
    ref = EfficientNetEncoder(copy.deepcopy(net), imagenet_labels()).eval()
    folded = EfficientNetEncoder(fold_batchnorm(net), imagenet_labels()).eval()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    frames = torch.randint(0, 256, (1, 3, 2, 224, 224), dtype=torch.uint8)
    a, b = ref.encode(frames), folded.encode(frames)  # encode() also runs the channels-last path
    torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-4)
    assert [c for c, _ in b.concepts] == [c for c, _ in a.concepts]


@pytest.mark.parametrize("variant", ["lite0", "lite2"])
def test_litenet_is_the_packages_folded_net_with_fewer_modules(variant):
    """``LiteNet`` (what the default encoder loads its folded weights into) has the parameter names and shapes of
    the package's EfficientNet-Lite after ``fold_batchnorm`` and computes the same features and logits, to the bit,
    on random weights with non-trivial BatchNorm statistics (unit test only). Lite2 checks the width and depth
    scaling and its 260 px padding; the net builds far fewer modules (no BatchNorm, padding or activation modules)."""
    from atomkit.models.encoder import fold_batchnorm
    from atomkit.models.lite import LiteNet

    ref = fold_batchnorm(_lite_with_batchnorm_statistics(variant))
    net = LiteNet(variant).eval()
    assert {k: v.shape for k, v in net.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    net.load_state_dict(ref.state_dict(), strict=True)
    size = ref.input_image_size
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)  # as encode() hands it
    with torch.inference_mode():
        a, b = ref.extract_features(x), net.extract_features(x)
        assert torch.equal(a, b)
        assert torch.equal(ref._fc(a.mean(dim=(2, 3))), net(x))
    assert len(list(net.modules())) < len(list(ref.modules())) / 2


def test_the_encoder_loads_its_folded_copy_from_the_cache(tmp_path, monkeypatch):
    """The default encoder reads the package's weights from a folded safetensors copy in the cache, written once.
    It gives the package's own (unfolded) net's features and concepts on real frames, reads nothing of the
    package's checkpoint while that file is unchanged, and is written again when the recorded source differs."""
    import contextlib
    import io
    import json

    from efficientnet_lite_pytorch import EfficientNet

    import atomkit.models.weights as W
    from atomkit.models.encoder import EfficientNetEncoder, efficientnet_lite, imagenet_labels
    from atomkit.media.video import clips, sample_frames
    from atomkit.media.scan import sample_videos

    source = W.efficientnet_lite_file("lite0")
    with contextlib.redirect_stdout(io.StringIO()):
        ref = EfficientNetEncoder(EfficientNet.from_pretrained("efficientnet-lite0", weights_path=str(source)).eval(),
                                  imagenet_labels()).eval()  # unfolded, as the package loads it
    enc = efficientnet_lite("lite0", pretrained=True, cache=tmp_path)
    folded = tmp_path / "efficientnet-lite0" / "model.safetensors"
    assert enc.weight_files == [folded] and folded.is_file()
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in enc.modules())
    assert not any(t.is_meta for t in [*enc.parameters(), *enc.buffers()])
    frames = [sample_frames(clips(v)[0]) for v in sample_videos()[:2]]
    outs = []
    for f in frames:
        a, b = ref.encode(f), enc.encode(f)
        torch.testing.assert_close(b.features, a.features, rtol=1e-4, atol=1e-4)
        assert [c for c, _ in b.concepts[:5]] == [c for c, _ in a.concepts[:5]]
        outs.append(b.concepts[0][0])
    assert outs[0] != outs[1]  # two different videos: the comparison can see a wrong weight

    hashed = []
    real_hash = W.sha256_file
    monkeypatch.setattr(W, "sha256_file", lambda p: hashed.append(p) or real_hash(p))
    mtime = folded.stat().st_mtime_ns
    efficientnet_lite("lite0", pretrained=True, cache=tmp_path)
    assert hashed == [] and folded.stat().st_mtime_ns == mtime  # not read, not rewritten
    meta = tmp_path / "efficientnet-lite0" / "atomkit.json"
    info = json.loads(meta.read_text())
    meta.write_text(json.dumps({**info, "source": {**info["source"], "size": 1}, "stamp": {"sha256": "0" * 64}}))
    efficientnet_lite("lite0", pretrained=True, cache=tmp_path)
    assert hashed == [source] and json.loads(meta.read_text())["stamp"] == info["stamp"]  # converted again


def test_the_embedder_equals_sentence_transformers():
    """The embedder built on ``meta`` from the package's safetensors file (BERT, mean pooling, normalisation written
    out here) gives sentence-transformers' own vectors for texts of different lengths: one word, captions, an empty
    string and a text past the 256-token limit (truncated alike), in one batch and one by one, and ranks a query's
    texts in the same order."""
    from sentence_transformers import SentenceTransformer

    import atomkit.models.weights as W
    from atomkit.models.embedder import minilm

    texts = ["dog", "A golden retriever (a kind of dog) runs along the seashore.", "",
             "A streetcar, or perhaps a parking meter or a jinrikisha.", "a red car " * 120,
             "Two cyclists in helmets ride past an old barn at noon."]
    ref = SentenceTransformer(str(W.minilm_dir()), device="cpu", local_files_only=True)
    want = ref.encode(texts, convert_to_tensor=True, normalize_embeddings=True).float()
    emb = minilm(W.minilm_dir())
    assert not any(t.is_meta for t in [*emb.parameters(), *emb.buffers()])
    got = emb.embed(texts, batch_size=4)  # two batches, padded to different lengths
    assert got.shape == (len(texts), 384) and emb.dim == 384
    torch.testing.assert_close(got, want, rtol=0, atol=2e-5)
    torch.testing.assert_close(torch.cat([emb.embed([t]) for t in texts]), want, rtol=0, atol=2e-5)
    assert (want @ want.T).triu(1).abs().max() < 0.99  # the texts' vectors differ: a mix-up would show
    query = emb.embed(["a dog on a beach"])[0]
    assert (got @ query).argsort().tolist() == (want @ query).argsort().tolist()
    assert emb.embed([]).shape == (0, 384)


def test_save_mappable_aligns_every_tensor_and_stays_a_safetensors_file(tmp_path):
    """``weights.save_mappable`` puts every tensor at a multiple of 64 bytes (odd sizes in between, so gaps are
    needed), ``mapped_safetensors`` gives back exactly the tensors written, none of the fillers, every view 64-byte
    aligned, and ``load_file`` reads the file too. The packed int8 kernel runs on a mapped matrix and gives what it
    gives on the original (it crashes the process on an int8 matrix 8 bytes off a 16-byte boundary)."""
    from safetensors.torch import load_file

    from atomkit.models.weights import ALIGN, mapped_safetensors, save_mappable

    torch.manual_seed(0)
    tensors = {"a.byte": torch.tensor([7], dtype=torch.uint8), "b.scale": torch.randn(61).bfloat16(),
               "c.w": torch.randint(-128, 127, (48, 64), dtype=torch.int8), "d.half": torch.randn(3, 5).half(),
               "e.empty": torch.zeros(0, 3), "f.flag": torch.tensor([True, False, True]), "g.s": torch.tensor(2.5),
               "h.i64": torch.arange(5), "i.w": torch.randint(-128, 127, (32, 64), dtype=torch.int8)}
    path = tmp_path / "engine.safetensors"
    save_mappable(tensors, path)
    got = mapped_safetensors(path)
    assert got.keys() == tensors.keys()
    for k, t in tensors.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
        assert got[k].data_ptr() % ALIGN == 0 or got[k].numel() == 0, k
    read = load_file(str(path))
    assert {k: v for k, v in read.items() if not k.startswith("atomkit.padding")}.keys() == tensors.keys()
    assert len(read) > len(tensors)  # the odd sizes needed fillers: the check above saw them left out
    assert all(torch.equal(read[k], t) for k, t in tensors.items())
    x = torch.randn(4, 64).bfloat16()
    for w, scale in (("c.w", torch.rand(48)), ("i.w", torch.rand(32))):
        s = scale.bfloat16()
        assert torch.equal(torch._weight_int8pack_mm(x, got[w], s), torch._weight_int8pack_mm(x, tensors[w], s))


def test_mapped_safetensors_equal_load_file_and_leave_the_file_alone(tmp_path):
    """``weights.mapped_safetensors`` (lazy private map) gives load_file's tensors for every dtype and shape the
    loaders meet, from a read-only file; writing to a tensor does not reach the file; a tensor at an offset its dtype
    cannot be mapped at (hand-written header) is read by load_file instead, the same values."""
    import json
    import os
    import struct

    from safetensors.torch import load_file, save_file

    from atomkit.models.weights import mapped_safetensors

    torch.manual_seed(0)
    tensors = {"w": torch.randn(5, 3), "h": torch.randn(4).half(), "b": torch.randn(2, 2).bfloat16(),
               "i": torch.arange(7, dtype=torch.int64), "q": torch.randint(-128, 127, (3, 3), dtype=torch.int8),
               "m": torch.tensor([True, False, True]), "s": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    os.chmod(path, 0o444)
    before = path.read_bytes()
    got, want = mapped_safetensors(path), load_file(str(path))
    assert got.keys() == want.keys() == tensors.keys()
    for k, t in want.items():
        assert got[k].dtype == t.dtype and got[k].shape == t.shape and torch.equal(got[k], t), k
    got["w"].mul_(0)  # copy on write: the map is private
    assert path.read_bytes() == before and torch.equal(mapped_safetensors(path)["w"], tensors["w"])

    odd = tmp_path / "odd.safetensors"  # a 3-byte uint8 tensor, then a float32 one at offset 3
    header = json.dumps({"a": {"dtype": "U8", "shape": [3], "data_offsets": [0, 3]},
                         "f": {"dtype": "F32", "shape": [2], "data_offsets": [3, 11]}}).encode()
    header += b" " * (-len(header) % 8)
    odd.write_bytes(struct.pack("<Q", len(header)) + header + bytes([1, 2, 3]) + struct.pack("<2f", 1.5, -2.0))
    got = mapped_safetensors(odd)
    assert got["a"].tolist() == [1, 2, 3] and got["f"].tolist() == [1.5, -2.0]
    cut = tmp_path / "cut.safetensors"  # cut short: load_file's own error, not a tensor past the end of the map
    cut.write_bytes(before[:-8])
    with pytest.raises(Exception, match="(?i)incomplete|invalid|metadata|buffer"):
        mapped_safetensors(cut)


def test_skeleton_skips_only_this_threads_meta_initialisers_and_restores_the_layers():
    """Under ``weights.skeleton`` a model is built on meta with the same tensors (names, shapes, dtypes) as under
    ``torch.device("meta")``, without calling the layers' initialisers; a real-device layer built inside still
    initialises, as does one another thread builds meanwhile; afterwards the layer classes have their own methods."""
    import threading

    from torch import nn
    from transformers import LlamaForCausalLM

    from atomkit.models.registry import tiny_llama_config
    from atomkit.models.weights import skeleton

    config = tiny_llama_config(1000)
    originals = {c: c.__dict__["reset_parameters"] for c in (nn.Linear, nn.Embedding, nn.LayerNorm)}
    calls = []
    seen = nn.Linear.reset_parameters

    def counting(self):
        calls.append(type(self).__name__)
        return seen(self)

    nn.Linear.reset_parameters = counting
    try:
        with torch.device("meta"):
            plain = LlamaForCausalLM(config)
        assert calls  # the plain meta build runs the initialisers
        torch.manual_seed(3)
        want = nn.Linear(8, 8).weight.detach().clone()
        calls.clear()
        got, inside = {}, {}

        def other_thread():
            torch.manual_seed(3)
            got["w"] = nn.Linear(8, 8).weight.detach().clone()

        with skeleton():
            built = LlamaForCausalLM(config)
            t = threading.Thread(target=other_thread)
            t.start()
            t.join()
            torch.manual_seed(3)
            inside["w"] = nn.Linear(8, 8, device="cpu").weight.detach().clone()
        assert calls.count("Linear") == 2  # the other thread's layer and the CPU layer; none of the model's
        assert torch.equal(got["w"], want) and torch.equal(inside["w"], want)
        a, b = plain.state_dict(), built.state_dict()
        assert a.keys() == b.keys() and all(a[k].shape == b[k].shape and a[k].dtype == b[k].dtype for k in a)
        assert all(t.is_meta for t in b.values())
        assert nn.Linear.reset_parameters is counting  # put back as it was found
    finally:
        nn.Linear.reset_parameters = seen
    assert all(c.__dict__["reset_parameters"] is f for c, f in originals.items())
