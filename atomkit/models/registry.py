"""Model specs by name. A spec builds three separately loadable modules: encoder, decoder, embedder.

    >>> import atomkit
    >>> atomkit.available_models()[:2]
    ['default', 'atom-paper']
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from atomkit.models import weights as W
from atomkit.config import cache_dir
from atomkit.errors import UnknownModel
from atomkit.models.decoder import Projector, TextDecoder
from atomkit.models.embedder import SentenceEmbedder, mean_pooled_bert, minilm
from atomkit.models import dual, smolvlm
from atomkit.models.encoder import VideoEncoder, clip_vision, efficientnet_lite0

MODULES = ("encoder", "decoder", "embedder")  # every spec has these
ALL_MODULES = (*MODULES, "retriever")  # a dual encoder (atomkit.models.dual) where a spec ranks with one


@dataclass(frozen=True)
class LoadOptions:
    """How a spec's modules are loaded."""

    device: str = "cpu"
    weights: Path | None = None  # user-supplied weights folder (atom-paper)
    random_weights: bool = False  # build the architecture with random weights (latency/memory work)
    cache: Path | None = None  # converted-weights cache; None = $ATOMKIT_CACHE or ~/.cache/atomkit


@dataclass(frozen=True)
class ModelSpec:
    name: str
    description: str
    encoder: Callable[[LoadOptions], VideoEncoder]
    decoder: Callable[[LoadOptions], TextDecoder]
    embedder: Callable[[LoadOptions], SentenceEmbedder]
    # module -> builds its architecture without reading weights (called under torch.device("meta") by
    # atomkit.pipeline.budget to know a module's size before loading it); random-weight specs use their loaders
    arch: dict[str, Callable[[LoadOptions], torch.nn.Module]] | None = None
    test_only: bool = False  # tiny models with a random-weight LM: unit tests only, their text is noise
    window: dict | None = None  # WindowConfig fields this model samples its clips with (frames, size), unless set
    repo: str | None = None  # the Hugging Face repository its weights come from (`atomkit fetch NAME`)
    retriever: Callable[[LoadOptions], torch.nn.Module] | None = None  # a dual encoder that ranks the clips
    # its decoder captions from the encoder's concepts alone (the concept bridge): an index can store the concepts
    # first and caption later without reading the video again (atomkit.retrieval.deferred)
    concept_captions: bool = False

    @property
    def modules(self) -> tuple[str, ...]:
        """The modules this spec builds: encoder, decoder, embedder, and its retriever where it has one."""
        return MODULES + (("retriever",) if self.retriever is not None else ())

    def is_random(self, opts: LoadOptions) -> bool:
        return self.test_only or opts.random_weights

    def architecture(self, module: str, opts: LoadOptions) -> torch.nn.Module:
        """The module's architecture as its loader builds it, without reading weights: call it under
        ``torch.device("meta")`` to get shapes and sizes without memory (``atomkit.pipeline.budget``)."""
        if module not in self.modules:
            raise ValueError(f"unknown module {module!r}; {self.name}'s modules are {self.modules}")
        build = (self.arch or {}).get(module)
        if build is None and not self.is_random(opts):
            raise ValueError(f"model {self.name!r} does not say how to build its {module} without weights")
        return (build or getattr(self, module))(opts).eval()

    def load(self, module: str, opts: LoadOptions):
        if module not in self.modules:
            raise ValueError(f"unknown module {module!r}; {self.name}'s modules are {self.modules}")
        return getattr(self, module)(opts).to(opts.device).eval()


@contextlib.contextmanager
def _seeded(seed: int = 0):
    """Random weights are reproducible and leave the caller's RNG state alone."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def llama32_1b_config():
    """The public Llama-3.2-1B architecture (about 1.24 B parameters, tied embeddings)."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
        num_attention_heads=32, num_key_value_heads=8, head_dim=64, max_position_embeddings=131072,
        rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=True, hidden_act="silu",
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
        bos_token_id=128000, eos_token_id=128001,
    )


TINY_INIT_RANGE = 0.2  # std of the tiny LM's random weights (transformers' default 0.02 answers one token to all)


def tiny_llama_config(vocab_size: int):
    """A 2-layer Llama for unit tests. Its weights are drawn 10x wider than transformers' default: with the
    default, the tiny LM's greedy answer is the same token for every prompt, so a test comparing captions
    could not tell one clip's caption from another's; with these, different prompts give different tokens."""
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=1024,
                       tie_word_embeddings=True, initializer_range=TINY_INIT_RANGE)


def _stand_in_tokenizer():
    """Random-weight LMs have no tokenizer of their own: the MiniLM WordPiece tokenizer stands in
    (it is on disk and loads instantly); prompt lengths stay realistic, generated text is noise."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(W.minilm_dir()), local_files_only=True)


def _random_lm(config) -> TextDecoder:
    from transformers import LlamaForCausalLM

    with _seeded():
        lm = LlamaForCausalLM(config)
    return TextDecoder(lm.eval(), _stand_in_tokenizer(), stop_at_eos=False)


# -- default: real weights from registry packages ------------------------------------------------
def _default_encoder(opts: LoadOptions) -> VideoEncoder:
    from atomkit.models import detector

    enc = efficientnet_lite0(pretrained=True, cache=opts.cache)  # its weight_files: the folded copy
    enc.detector = detector.load()  # people and everyday objects (COCO) beside the ImageNet classes
    return enc


def llama_from_safetensors(folder: Path):
    """A ``LlamaForCausalLM`` whose weights are the folder's safetensors files, mapped from the page cache.

    The model is built on the meta device (no random initialisation: transformers' ``from_pretrained`` drew
    SmolLM2's 28 M-entry embedding table from a normal distribution on every load, about 0.2 s, because the
    converted file stores the tied matrix once, as ``lm_head.weight``) and its parameters are the files' tensors
    (``assign``): pages are read when first used, so an engine that keeps only its packed copy
    (``TextDecoder.keep_only_engine``) never reads the layer matrices at all. The result equals
    ``from_pretrained``'s (tested: same tensors, same generation config, same attention implementation)."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from atomkit.models.weights import mapped_safetensors, skeleton

    folder = Path(folder)
    config = LlamaConfig.from_pretrained(folder, local_files_only=True)
    config._name_or_path = str(folder)  # what the engine store keys the LM's files by
    with skeleton():
        lm = LlamaForCausalLM(config)
    state: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(mapped_safetensors(f))
    head, embed = "lm_head.weight", "model.embed_tokens.weight"
    if config.tie_word_embeddings and (head in state) != (embed in state):
        state[head] = state[embed] = state.get(head, state.get(embed))
    result = lm.load_state_dict(state, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        from atomkit.errors import AtomkitError

        raise AtomkitError(f"{folder}: its safetensors files do not match its config.json (missing "
                           f"{result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]}); delete the folder "
                           "and it is converted again on the next run")
    if config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    # the rotary tables are buffers computed from the config, not stored: build them on the CPU
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=config)
    if (folder / "generation_config.json").is_file():
        lm.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    return lm.eval()


def _default_decoder(opts: LoadOptions) -> TextDecoder:
    folder = W.smollm2_converted(opts.cache)
    lm = llama_from_safetensors(folder)
    dec = TextDecoder(lm, W.fast_tokenizer(folder))
    dec.store = (opts.cache or cache_dir()) / "engines"
    dec.weight_files = sorted(Path(folder).glob("*.safetensors"))
    return dec


def _minilm(opts: LoadOptions) -> SentenceEmbedder:
    emb = minilm(W.minilm_dir(), device=opts.device)
    emb.weight_files = sorted(W.minilm_dir().glob("*.safetensors"))
    return emb


# -- architectures without weights (atomkit.pipeline.budget builds them on the meta device) -----------------
def _lite0_arch(opts: LoadOptions) -> VideoEncoder:
    return efficientnet_lite0(pretrained=False)


def _smollm2_arch(opts: LoadOptions) -> TextDecoder:
    """SmolLM2's architecture from the converted copy's config (converting first if this is the first use)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(W.smollm2_converted(opts.cache), local_files_only=True)
    return TextDecoder(LlamaForCausalLM(config), tokenizer=None)


def _minilm_arch(opts: LoadOptions) -> torch.nn.Module:
    return mean_pooled_bert(W.minilm_dir())


def _paper_encoder_arch(opts: LoadOptions) -> VideoEncoder:
    return clip_vision("ViT-L-14")


def _paper_decoder_arch(opts: LoadOptions) -> TextDecoder:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = llama32_1b_config() if opts.random_weights else \
        LlamaConfig.from_pretrained(W.paper_weights(opts.weights)["llama"], local_files_only=True)
    dec = TextDecoder(LlamaForCausalLM(config), tokenizer=None)
    dec.projector = Projector(768, config.hidden_size)
    return dec


# -- atom-paper: CLIP ViT-L/14 -> projector -> Llama-3.2-1B ---------------------------------------
def _paper_files(opts: LoadOptions) -> dict[str, Path]:
    """The weight files of atom-paper: the user's, or random ones written once to the cache in the same
    layout, so a random-weight run reads its weights from disk exactly as a real one does."""
    if not opts.random_weights:
        return W.paper_weights(opts.weights)
    import hashlib

    config = llama32_1b_config()
    arch = hashlib.sha256(("ViT-L-14|projector 768|" + config.to_json_string()).encode()).hexdigest()[:16]
    folder = (opts.cache or cache_dir()) / "random-weights" / f"atom-paper-seed0-{arch}"
    if not (folder / "atomkit.json").is_file():
        print(f"atomkit: writing atom-paper random weights once to {folder} (about 6 GB)", file=sys.stderr)
        with _seeded():
            enc = clip_vision("ViT-L-14")
        dec = _random_lm(config)
        with _seeded(1):
            dec.projector = Projector(768, 2048)
        write_paper_layout(folder, enc, dec, stamp={"arch": arch})
        del enc, dec
    return W.paper_weights(folder)


def write_paper_layout(folder: Path, encoder, decoder: TextDecoder, stamp: dict | None = None) -> Path:
    """Write an encoder/decoder pair in the atom-paper weights layout (``weights.PAPER_LAYOUT``), atomically."""
    import json

    from safetensors.torch import save_file

    from atomkit.io import atomic_dir

    with atomic_dir(folder) as tmp:
        visual = {f"visual.{k}": v.contiguous() for k, v in encoder.visual.state_dict().items()}
        save_file(visual, str(tmp / "open_clip_vit_l14.safetensors"))
        decoder.lm.save_pretrained(tmp / "llama-3.2-1b")
        decoder.tokenizer.save_pretrained(tmp / "llama-3.2-1b")
        save_file({k: v.contiguous() for k, v in decoder.projector.state_dict().items()}, str(tmp / "projector.safetensors"))
        (tmp / "atomkit.json").write_text(json.dumps({"written_by": "atomkit.models.registry.write_paper_layout", **(stamp or {})}))
    return folder


def _paper_encoder(opts: LoadOptions) -> VideoEncoder:
    enc = clip_vision("ViT-L-14", checkpoint=_paper_files(opts)["clip"])
    enc.weight_files = [_paper_files(opts)["clip"]]
    return enc


def _paper_decoder(opts: LoadOptions) -> TextDecoder:
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, LlamaForCausalLM

    files = _paper_files(opts)
    lm = LlamaForCausalLM.from_pretrained(files["llama"], dtype=torch.float32, local_files_only=True)
    projector = Projector(768, lm.config.hidden_size)
    projector.load_state_dict(load_file(str(files["projector"])))
    tok = AutoTokenizer.from_pretrained(files["llama"], local_files_only=True)
    # random weights: never stop at EOS, so every run decodes the full length (what latency work wants)
    dec = TextDecoder(lm.eval(), tok, projector=projector, stop_at_eos=not opts.random_weights)
    dec.store = (opts.cache or cache_dir()) / "engines"
    dec.weight_files = [*sorted(Path(files["llama"]).glob("*.safetensors")), files["projector"]]
    return dec


# -- tiny versions of both architectures: unit tests only ----------------------------------------
def _tiny_default_encoder(opts: LoadOptions) -> VideoEncoder:
    """The real EfficientNet-Lite0 (4.6 M parameters, its weights ship in a package and load in well under a
    second): its concepts differ from clip to clip as a real encoder's do, so the captions of tests differ too.
    (A random Lite0 reports the same three classes at p=0.001 for every clip.)"""
    return efficientnet_lite0(pretrained=True, cache=opts.cache)


def _tiny_decoder(opts: LoadOptions) -> TextDecoder:
    return _random_lm(tiny_llama_config(len(_stand_in_tokenizer())))


def _tiny_paper_encoder(opts: LoadOptions) -> VideoEncoder:
    with _seeded():
        return clip_vision("ViT-L-14", vision_overrides=dict(width=64, layers=2, head_width=32, patch_size=32, embed_dim=32))


def _tiny_paper_decoder(opts: LoadOptions) -> TextDecoder:
    dec = _tiny_decoder(opts)
    with _seeded(1):
        dec.projector = Projector(32, 64)
    return dec


# -- SmolVLM2: one public video-language model split into a resident encoder and a resident decoder ----------------
def _smolvlm_folder(name: str, size: "smolvlm.Size", opts: LoadOptions) -> Path:
    """The checkpoint folder: random weights written once to the cache, the user's --weights folder, or the
    snapshot in the Hugging Face cache (read offline)."""
    from atomkit.models import hub

    if opts.random_weights or size is smolvlm.TINY:
        return smolvlm.random_folder(size, opts.cache or cache_dir(), quiet=size is smolvlm.TINY)
    return hub.snapshot(name, size.repo, opts.weights, needs=("config.json", "tokenizer.json"))


def _smolvlm_spec(name: str, size: "smolvlm.Size", description: str, test_only: bool = False) -> ModelSpec:
    def encoder(opts: LoadOptions) -> VideoEncoder:
        return smolvlm.load_encoder(_smolvlm_folder(name, size, opts))

    def decoder(opts: LoadOptions) -> TextDecoder:
        dec = smolvlm.load_decoder(_smolvlm_folder(name, size, opts),
                                   stop_at_eos=not (opts.random_weights or size is smolvlm.TINY))
        dec.store = (opts.cache or cache_dir()) / "engines"
        return dec

    arch = {"encoder": lambda o: smolvlm.architecture(size, "encoder"),
            "decoder": lambda o: smolvlm.architecture(size, "decoder"), "embedder": _minilm_arch}
    return ModelSpec(name, description, encoder, decoder, _minilm, arch=arch, test_only=test_only,
                     window={"frames": smolvlm.FRAMES, "size": size.frame_px}, repo=None if test_only else size.repo)


# -- a dual encoder beside the default captioner: the retriever ranks, the captioner writes ---------------------------
def _dual_folder(name: str, tower: "dual.Tower", opts: LoadOptions) -> Path:
    from atomkit.models import hub

    if opts.random_weights or tower is dual.TINY:
        return dual.random_folder(tower, opts.cache or cache_dir(), quiet=tower is dual.TINY)
    return hub.snapshot(name, tower.repo, opts.weights, needs=("open_clip_config.json",))


def _dual_spec(name: str, tower: "dual.Tower", description: str, base: str = "default") -> ModelSpec:
    captioner = _SPECS[base]

    def retriever(opts: LoadOptions) -> torch.nn.Module:
        return dual.load(_dual_folder(name, tower, opts))

    arch = {**(captioner.arch or {}), "retriever": lambda o: dual.architecture(tower)}
    return ModelSpec(name, description, captioner.encoder, captioner.decoder, captioner.embedder, arch=arch,
                     test_only=captioner.test_only, window=captioner.window,
                     repo=None if tower is dual.TINY else tower.repo, retriever=retriever,
                     concept_captions=captioner.concept_captions)


_SPECS = {
    s.name: s
    for s in [
        ModelSpec("default", "EfficientNet-Lite0 concepts -> SmolLM2-135M-Instruct captions; all-MiniLM-L6-v2 "
                  "(real weights from registry packages)", _default_encoder, _default_decoder, _minilm,
                  arch={"encoder": _lite0_arch, "decoder": _smollm2_arch, "embedder": _minilm_arch},
                  concept_captions=True),
        ModelSpec("atom-paper", "the paper's CLIP ViT-L/14 -> projector -> Llama-3.2-1B; all-MiniLM-L6-v2 "
                  f"(weights you supply: --weights DIR or ${W.PAPER_WEIGHTS_ENV}; or --random-weights)",
                  _paper_encoder, _paper_decoder, _minilm,
                  arch={"encoder": _paper_encoder_arch, "decoder": _paper_decoder_arch, "embedder": _minilm_arch}),
        *(_smolvlm_spec(f"smolvlm2-{key}", smolvlm.SIZES[key], f"SmolVLM2-{label} (HuggingFaceTB, Apache-2.0): "
                        "its SigLIP tower + connector as the encoder, its SmolLM2 as the decoder; all-MiniLM-L6-v2 "
                        "(or --random-weights)")
          for key, label in (("256m", "256M-Video-Instruct"), ("500m", "500M-Video-Instruct"), ("2.2b", "2.2B-Instruct"))),
        ModelSpec("tiny-default", "EfficientNet-Lite0 (real weights) -> 2-layer Llama with random weights whose "
                  "captions differ per clip (unit tests only: its text is noise)",
                  _tiny_default_encoder, _tiny_decoder, _minilm, arch={"encoder": _lite0_arch, "embedder": _minilm_arch},
                  test_only=True, concept_captions=True),
        ModelSpec("tiny-paper", "2-layer ViT -> projector -> 2-layer Llama, random weights (unit tests only)",
                  _tiny_paper_encoder, _tiny_paper_decoder, _minilm, arch={"embedder": _minilm_arch}, test_only=True),
        _smolvlm_spec("tiny-smolvlm2", smolvlm.TINY, "SmolVLM2's architecture, tiny, random weights written in its "
                      "checkpoint layout and loaded through its loader (unit tests only: its text is noise)",
                      test_only=True),
    ]
}


for _spec in (
    _dual_spec("default-mobileclip2-s0", dual.TOWERS["mobileclip2-s0"], "the default captioner, ranked by MobileCLIP2-S0 "
               "(Apple, a dual encoder: each clip's frames pooled, the query in the same space)"),
    _dual_spec("default-mobileclip-s2", dual.TOWERS["mobileclip-s2"], "the default captioner, ranked by MobileCLIP-S2 "
               "(Apple, a dual encoder: each clip's frames pooled, the query in the same space)"),
    _dual_spec("tiny-clip", dual.TINY, "tiny-default ranked by a tiny random open_clip dual encoder written in open_clip's "
               "checkpoint layout (unit tests only)", base="tiny-default"),
):
    _SPECS[_spec.name] = _spec
_ORDER = ["default", "atom-paper", "smolvlm2-256m", "smolvlm2-500m", "smolvlm2-2.2b", "default-mobileclip2-s0",
          "default-mobileclip-s2", "tiny-default", "tiny-paper", "tiny-smolvlm2", "tiny-clip"]
_SPECS = {name: _SPECS[name] for name in _ORDER}


def available_models() -> list[str]:
    """Names of the model specs, real ones first."""
    return list(_SPECS)


def get_spec(name: str) -> ModelSpec:
    """The spec called ``name``; an unknown name raises ``UnknownModel`` listing the valid ones."""
    try:
        return _SPECS[name]
    except KeyError:
        raise UnknownModel(name, available_models()) from None
