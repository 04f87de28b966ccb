"""Build small Wan2.1- and HunyuanVideo-architecture pipelines in the diffusers folder layout.

No weights can be downloaded on our machines, so tests and the built-in default model are made
here: the real diffusers/transformers classes (WanTransformer3DModel, AutoencoderKLWan,
UMT5EncoderModel, a T5 tokenizer trained with the ``tokenizers`` library, UniPC flow scheduler),
only with tiny shapes, saved exactly as Wan-AI/Wan2.1-T2V-1.3B-Diffusers is laid out; Wan2.1 image
to video (``build_tiny_wan21_i2v``) as Wan-AI/Wan2.1-I2V-14B-480P-Diffusers; the Wan2.2
variants (``build_tiny_wan22_two_experts``, ``build_tiny_wan22_ti2v``) as their Wan-AI/Wan2.2-*-Diffusers
folders are; and likewise HunyuanVideo (``build_tiny_hunyuan``) as hunyuanvideo-community/HunyuanVideo is laid out.
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import torch

# The vocabulary of the synthetic world the reference model is trained on, plus everyday words, so
# the tokenizer splits real prompts into meaningful pieces rather than single characters.
COLORS = ["red", "green", "blue", "yellow", "white", "black", "purple", "orange"]
SHAPES = ["circle", "square", "triangle"]
DIRECTIONS = ["left", "right", "up", "down"]
_EVERYDAY = (
    "a an the of in on with and at to from by is are cat dog person car tree house sky sea city "
    "night day light dark small large fast slow video camera scene moving walking running flying "
    "over under through bright colorful low quality blurry static still frame picture photo"
).split()

TINY_WAN_TRANSFORMER: dict[str, Any] = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=3,
    attention_head_dim=32,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=256,
    num_layers=4,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    rope_max_seq_len=1024,
)
TINY_WAN_VAE: dict[str, Any] = dict(
    base_dim=8,
    z_dim=16,
    dim_mult=[1, 1, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
)
# The Wan2.2 VAE as Wan-AI/Wan2.2-TI2V-5B-Diffusers configures it (48 latent channels, residual
# blocks, a 2x2 pixel patchify before the 8x downsampling: 16x spatially, 4x in time), narrower.
# The latent statistics are made-up values that keep the de-normalisation visible in tests.
TINY_WAN22_VAE: dict[str, Any] = dict(
    base_dim=8,
    z_dim=48,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    is_residual=True,
    in_channels=12,
    out_channels=12,
    patch_size=2,
    scale_factor_spatial=16,
    scale_factor_temporal=4,
    latents_mean=[round(-0.5 + i / 47, 4) for i in range(48)],
    latents_std=[round(0.5 + i / 47, 4) for i in range(48)],
)
TINY_UMT5: dict[str, Any] = dict(
    d_model=32,
    d_kv=8,
    d_ff=64,
    num_layers=2,
    num_heads=4,
    relative_attention_num_buckets=8,
    relative_attention_max_distance=16,
    dropout_rate=0.0,
    feed_forward_proj="gated-gelu",
    pad_token_id=0,
    eos_token_id=1,
    decoder_start_token_id=0,
)
# Wan2.1-T2V-1.3B-Diffusers' scheduler: UniPC over flow-matching sigmas.
WAN_SCHEDULER: dict[str, Any] = dict(
    num_train_timesteps=1000,
    prediction_type="flow_prediction",
    use_flow_sigmas=True,
    flow_shift=3.0,
    solver_order=2,
    predict_x0=True,
    solver_type="bh2",
    lower_order_final=True,
)
TINY_TEXT_LENGTH = 32


def caption_corpus() -> list[str]:
    """Sentences for tokenizer training: every caption of the synthetic world, plus everyday text."""
    captions = [
        f"a {c} {s} moving {d} on a {bg} background"
        for c, s, d, bg in itertools.product(COLORS, SHAPES, DIRECTIONS, COLORS)
        if c != bg
    ]
    everyday = [" ".join(_EVERYDAY[i : i + 8]) for i in range(0, len(_EVERYDAY), 3)]
    return captions + everyday * 20


def train_tokenizer(output_dir: Path, vocab_size: int = 256, max_length: int = TINY_TEXT_LENGTH) -> None:
    """Train a T5-style Unigram tokenizer (pad=0, eos=1, unk=2) and save it as transformers does."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import T5TokenizerFast

    tok = Tokenizer(models.Unigram())
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    trainer = trainers.UnigramTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"], unk_token="<unk>", shrinking_factor=0.9
    )
    tok.train_from_iterator(caption_corpus(), trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="$A </s>", pair="$A </s> $B </s>", special_tokens=[("</s>", 1)]
    )
    T5TokenizerFast(tokenizer_object=tok, extra_ids=0, model_max_length=max_length).save_pretrained(output_dir)


def build_tiny_wan(
    output_dir: str | Path,
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
    text_encoder_config: dict[str, Any] | None = None,
    scheduler_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight tiny Wan2.1 T2V pipeline to ``output_dir`` in the diffusers layout."""
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    train_tokenizer(out / "tokenizer")
    vocab_size = len(AutoTokenizer.from_pretrained(out / "tokenizer"))

    torch.manual_seed(seed)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=vocab_size, **(text_encoder_config or TINY_UMT5)))
    transformer_kwargs = {**TINY_WAN_TRANSFORMER, **(transformer_config or {})}
    transformer_kwargs["text_dim"] = text_encoder.config.d_model
    transformer = WanTransformer3DModel(**transformer_kwargs)
    vae = AutoencoderKLWan(**{**TINY_WAN_VAE, **(vae_config or {})})
    save_wan_components(out, text_encoder, transformer, vae, scheduler_config)
    return out


def save_low_noise_expert(out: Path, seed: int) -> None:
    """``transformer_2``: the folder's transformer config with other random weights (seed + 1)."""
    from diffusers import WanTransformer3DModel

    config = WanTransformer3DModel.load_config(out / "transformer")
    torch.manual_seed(seed + 1)
    WanTransformer3DModel.from_config(config).save_pretrained(out / "transformer_2", safe_serialization=True)


def build_tiny_wan22_two_experts(output_dir: str | Path, seed: int = 0, boundary_ratio: float = 0.875) -> Path:
    """A tiny Wan2.2 T2V-A14B-style folder: the tiny Wan2.1 pipeline plus a second transformer of
    other random weights (``transformer_2``, the low-noise expert) and ``boundary_ratio`` in
    model_index.json, as ``Wan-AI/Wan2.2-T2V-A14B-Diffusers`` lays them out."""
    out = build_tiny_wan(output_dir, seed=seed)
    save_low_noise_expert(out, seed)
    write_model_index(out, components={**WAN_COMPONENTS, "transformer_2": ["diffusers", "WanTransformer3DModel"]},
                      extra={"boundary_ratio": boundary_ratio})
    return out


def build_tiny_wan22_ti2v(output_dir: str | Path, seed: int = 0, transformer_config: dict[str, Any] | None = None
                          ) -> Path:
    """A tiny Wan2.2 TI2V-5B-style folder, as ``Wan-AI/Wan2.2-TI2V-5B-Diffusers`` lays it out: one
    transformer with 48 input and output channels, the Wan2.2 VAE (:data:`TINY_WAN22_VAE`), UniPC
    at the release's shift 5.0, and ``"expand_timesteps": true`` (with ``boundary_ratio`` null and
    no ``transformer_2``) in model_index.json. ``transformer_config`` overrides the transformer's
    shape (not its channels, which follow the VAE)."""
    channels = TINY_WAN22_VAE["z_dim"]
    transformer = {**(transformer_config or {}), "in_channels": channels, "out_channels": channels}
    out = build_tiny_wan(output_dir, seed=seed, transformer_config=transformer, vae_config=TINY_WAN22_VAE,
                         scheduler_config={"flow_shift": 5.0})
    write_model_index(out, components={**WAN_COMPONENTS, "transformer_2": [None, None]},
                      extra={"boundary_ratio": None, "expand_timesteps": True})
    return out


# The CLIP image side of Wan2.1 I2V (ViT-H/14 at 224 pixels in the release: 1280 wide, 32 layers,
# 257 tokens), shrunk: 32 pixels in 8-pixel patches, so 16 patches and a class token.
TINY_CLIP_VISION: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    image_size=32,
    patch_size=8,
    projection_dim=32,
)


def build_tiny_wan21_i2v(output_dir: str | Path, seed: int = 0) -> Path:
    """A tiny Wan2.1 I2V folder, as ``Wan-AI/Wan2.1-I2V-14B-480P-Diffusers`` lays it out: the tiny
    Wan2.1 components with a transformer that takes the image (``image_dim`` = the CLIP width, the
    added key/value projections of its cross-attention as wide as the model, 36 input channels:
    16 noise + 4 mask + 16 condition latents of the tiny VAE), a ``CLIPVisionModel`` and a
    ``CLIPImageProcessor`` resizing and cropping to that model's 32 pixels, and
    ``WanImageToVideoPipeline`` in model_index.json."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    latent = TINY_WAN_VAE["z_dim"]
    width = TINY_WAN_TRANSFORMER["num_attention_heads"] * TINY_WAN_TRANSFORMER["attention_head_dim"]
    transformer = dict(in_channels=2 * latent + 4, out_channels=latent, image_dim=TINY_CLIP_VISION["hidden_size"],
                       added_kv_proj_dim=width)
    out = build_tiny_wan(output_dir, seed=seed, transformer_config=transformer)
    torch.manual_seed(seed + 1)
    CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).save_pretrained(out / "image_encoder",
                                                                         safe_serialization=True)
    side = TINY_CLIP_VISION["image_size"]
    CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side}).save_pretrained(
        out / "image_processor")
    components = {**WAN_COMPONENTS, "image_encoder": ["transformers", "CLIPVisionModel"],
                  "image_processor": ["transformers", "CLIPImageProcessor"]}
    write_model_index(out, "WanImageToVideoPipeline", dict(sorted(components.items())))
    return out


def build_tiny_wan22_i2v(output_dir: str | Path, seed: int = 0, boundary_ratio: float = 0.9) -> Path:
    """A tiny Wan2.2 I2V-A14B-style folder, as ``Wan-AI/Wan2.2-I2V-A14B-Diffusers`` lays it out: two
    transformers of other random weights taking 36 channels (16 noise + 4 mask + 16 condition
    latents) and no image embedding, ``boundary_ratio`` 0.9, no image encoder or processor
    (``[null, null]``), and ``WanImageToVideoPipeline`` in model_index.json."""
    latent = TINY_WAN_VAE["z_dim"]
    out = build_tiny_wan(output_dir, seed=seed, transformer_config=dict(in_channels=2 * latent + 4,
                                                                        out_channels=latent))
    save_low_noise_expert(out, seed)
    components = {**WAN_COMPONENTS, "transformer_2": ["diffusers", "WanTransformer3DModel"],
                  "image_encoder": [None, None], "image_processor": [None, None]}
    write_model_index(out, "WanImageToVideoPipeline", dict(sorted(components.items())),
                      extra={"boundary_ratio": boundary_ratio, "expand_timesteps": False})
    return out


def save_wan_components(out: Path, text_encoder, transformer, vae, scheduler_config: dict[str, Any] | None = None
                        ) -> None:
    """Save the model components, the UniPC flow scheduler (``scheduler_config`` over
    :data:`WAN_SCHEDULER`) and model_index.json next to a tokenizer."""
    from diffusers import UniPCMultistepScheduler

    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    UniPCMultistepScheduler(**{**WAN_SCHEDULER, **(scheduler_config or {})}).save_pretrained(out / "scheduler")
    write_model_index(out)


# model_index.json components as the published checkpoints list them (library, class).
WAN_COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["diffusers", "UniPCMultistepScheduler"],
    "text_encoder": ["transformers", "UMT5EncoderModel"],
    "tokenizer": ["transformers", "T5TokenizerFast"],
    "transformer": ["diffusers", "WanTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLWan"],
}
HUNYUAN_COMPONENTS: dict[str, list[str]] = {
    "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
    "text_encoder": ["transformers", "LlamaModel"],
    "text_encoder_2": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "LlamaTokenizerFast"],
    "tokenizer_2": ["transformers", "CLIPTokenizer"],
    "transformer": ["diffusers", "HunyuanVideoTransformer3DModel"],
    "vae": ["diffusers", "AutoencoderKLHunyuanVideo"],
}


def write_model_index(out: Path, pipeline_class: str = "WanPipeline", components: dict | None = None,
                      extra: dict | None = None) -> None:
    """model_index.json as Wan-AI/Wan2.1-T2V-1.3B-Diffusers (or the given pipeline) ships it;
    ``extra``: pipeline config entries besides the components (Wan2.2's ``boundary_ratio``)."""
    import diffusers

    index = {"_class_name": pipeline_class, "_diffusers_version": diffusers.__version__,
             **(extra or {}), **(components or WAN_COMPONENTS)}
    (out / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")


# --------------------------------------------------------------------------- HunyuanVideo
# Shapes of a random tiny HunyuanVideo T2V pipeline: the real classes with dimensions small enough
# for CPU tests. The transformer's text widths follow the encoders (Llama hidden, CLIP pooled).
TINY_HUNYUAN_TRANSFORMER: dict[str, Any] = dict(
    in_channels=16,
    out_channels=16,
    num_attention_heads=2,
    attention_head_dim=16,
    num_layers=2,
    num_single_layers=2,
    num_refiner_layers=1,
    mlp_ratio=2.0,
    patch_size=2,
    patch_size_t=1,
    qk_norm="rms_norm",
    guidance_embeds=True,
    rope_theta=256.0,
    rope_axes_dim=(4, 6, 6),
)
TINY_HUNYUAN_VAE: dict[str, Any] = dict(
    latent_channels=16,
    block_out_channels=(8, 8, 16, 16),
    layers_per_block=1,
    norm_num_groups=4,
)
TINY_LLAMA: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
)
TINY_CLIP_TEXT: dict[str, Any] = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    projection_dim=32,
    max_position_embeddings=77,
)
# hunyuanvideo-community/HunyuanVideo's scheduler: flow-matching Euler with the published shift 7.
HUNYUAN_SCHEDULER: dict[str, Any] = dict(num_train_timesteps=1000, shift=7.0)
LLAMA_SPECIAL_TOKENS = [
    "<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
]
CLIP_SPECIAL_TOKENS = ["<|startoftext|>", "<|endoftext|>"]


def train_llama_tokenizer(output_dir: Path, prompt_template: str, text_length: int = TINY_TEXT_LENGTH) -> int:
    """Train a Llama-3-style byte-level BPE tokenizer; returns the token count of the template's prefix.

    That count is the ``crop_start`` of this tokenizer: the embeddings of the system prompt that
    HunyuanVideo's text path drops (95 for the published Llama 3 tokenizer). The tokenizer's
    ``model_max_length`` is prefix + ``text_length``, so the prompt part is ``text_length`` tokens.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import LlamaTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=LLAMA_SPECIAL_TOKENS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(caption_corpus() + [prompt_template.format(c) for c in caption_corpus()[:50]], trainer)
    bos = LLAMA_SPECIAL_TOKENS[0]
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tok.token_to_id(bos))]
    )
    crop_start = len(tok.encode(prompt_template.split("{}")[0]).ids)
    LlamaTokenizerFast(
        tokenizer_object=tok,
        bos_token=bos,
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token=None,
        padding_side="right",
        model_max_length=crop_start + text_length,
    ).save_pretrained(output_dir)
    return crop_start


def train_clip_tokenizer(output_dir: Path, vocab_size: int = 320) -> None:
    """Train a BPE in CLIP's scheme (lower-cased, byte-level, ``</w>`` word ends) and save it as CLIPTokenizer."""
    from tokenizers import Regex, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import CLIPTokenizer

    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.normalizer = normalizers.Sequence(
        [normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Lowercase()]
    )
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(r"[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"), behavior="removed", invert=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ]
    )
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=CLIP_SPECIAL_TOKENS,
        end_of_word_suffix="</w>",
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(caption_corpus(), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    # The trainer numbers the word-final characters in hash order, which changes from run to run;
    # renumber (specials, the other unmerged tokens sorted, then merges in order) so a rerun
    # gives the same ids and a trained text encoder is reproducible.
    merged = list(dict.fromkeys("".join(m) for m in merges))
    unmerged = sorted(set(model["vocab"]) - set(CLIP_SPECIAL_TOKENS) - set(merged))
    vocab = {token: i for i, token in enumerate(CLIP_SPECIAL_TOKENS + unmerged + merged)}
    CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=77).save_pretrained(output_dir)


def build_tiny_hunyuan(
    output_dir: str | Path,
    seed: int = 0,
    transformer_config: dict[str, Any] | None = None,
    vae_config: dict[str, Any] | None = None,
) -> Path:
    """Write a random-weight tiny HunyuanVideo T2V pipeline to ``output_dir``.

    Laid out as hunyuanvideo-community/HunyuanVideo: transformer/, vae/, text_encoder/ (LlamaModel),
    tokenizer/ (Llama BPE), text_encoder_2/ (CLIPTextModel), tokenizer_2/ (CLIP BPE), scheduler/ and
    model_index.json. An sglang_config.json records the template crop of this tokenizer.
    """
    from diffusers import AutoencoderKLHunyuanVideo, HunyuanVideoTransformer3DModel
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
    from transformers import CLIPTokenizer, PreTrainedTokenizerFast

    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    crop_start = train_llama_tokenizer(out / "tokenizer", DEFAULT_PROMPT_TEMPLATE["template"])
    train_clip_tokenizer(out / "tokenizer_2")
    # Loaded as saved: transformers 5's LlamaTokenizerFast would rebuild it SentencePiece-style.
    llama_tok = PreTrainedTokenizerFast.from_pretrained(out / "tokenizer")
    clip_tok = CLIPTokenizer.from_pretrained(out / "tokenizer_2")

    torch.manual_seed(seed)
    text_encoder, text_encoder_2 = new_hunyuan_text_encoders(llama_tok, clip_tok)
    transformer = HunyuanVideoTransformer3DModel(
        **{
            **TINY_HUNYUAN_TRANSFORMER,
            **(transformer_config or {}),
            "text_embed_dim": text_encoder.config.hidden_size,
            "pooled_projection_dim": text_encoder_2.config.hidden_size,
        }
    )
    vae = AutoencoderKLHunyuanVideo(**{**TINY_HUNYUAN_VAE, **(vae_config or {})})

    save_hunyuan_components(out, text_encoder, text_encoder_2, transformer, vae)
    overrides = {"pipeline_options": {"prompt_template": {"crop_start": crop_start}}}
    (out / "sglang_config.json").write_text(json.dumps(overrides, indent=2) + "\n")
    return out


def new_hunyuan_text_encoders(llama_tokenizer, clip_tokenizer):
    """A tiny ``LlamaModel`` and ``CLIPTextModel`` sized to these tokenizers (random weights from torch's RNG)."""
    from transformers import CLIPTextConfig, CLIPTextModel, LlamaConfig, LlamaModel

    def token_ids(tokenizer) -> dict[str, Any]:
        return dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    return (LlamaModel(LlamaConfig(**token_ids(llama_tokenizer), **TINY_LLAMA)),
            CLIPTextModel(CLIPTextConfig(**token_ids(clip_tokenizer), **TINY_CLIP_TEXT)))


def save_hunyuan_components(out: Path, text_encoder, text_encoder_2, transformer, vae) -> None:
    """Save the model components, the flow-matching Euler scheduler and model_index.json next to the tokenizers."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    text_encoder.save_pretrained(out / "text_encoder", safe_serialization=True)
    text_encoder_2.save_pretrained(out / "text_encoder_2", safe_serialization=True)
    transformer.save_pretrained(out / "transformer", safe_serialization=True)
    vae.save_pretrained(out / "vae", safe_serialization=True)
    FlowMatchEulerDiscreteScheduler(**HUNYUAN_SCHEDULER).save_pretrained(out / "scheduler")
    write_model_index(out, "HunyuanVideoPipeline", HUNYUAN_COMPONENTS)
