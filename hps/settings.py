"""The one settings object: `HPS_*` environment variables, a `.env` file and a TOML file.

Sections are nested models; in the environment a section and its key are joined by a double
underscore (`HPS_DISCORD__TOKEN`, `HPS_LIMITS__ROUNDS_PER_HOUR`); in TOML they are tables
(`[discord] token = "..."`). The TOML file is `HPS_CONFIG` if set, else `./hps.toml` if present
(`HPS_CONFIG=`, empty, reads no TOML file).
`./.env` (the file Docker Compose reads too; `HPS_ENV_FILE` names another, `HPS_ENV_FILE=`
empty none) holds `HPS_*` variables in the environment's spelling; its other variables
(e.g. Compose's `POSTGRES_PASSWORD`) are left alone.
Environment variables win over `.env`, `.env` over the TOML file, the file over the defaults.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal
from urllib.parse import parse_qs, unquote, urlsplit

from pydantic import (
    BaseModel,
    Field,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_settings import (
    BaseSettings,
    DotEnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

ENV_PREFIX = "HPS_"
NESTED_DELIMITER = "__"
DEFAULT_CONFIG_FILE = Path("hps.toml")
DEFAULT_ENV_FILE = Path(".env")


# The reward models `hps eval --scorers` and the adaptation's offline evaluation can use
# (`pipeline.scorers` implements one for each name).
SCORER_NAMES = ("hps", "hpsv2", "pickscore", "aesthetic", "clip")
ScorerName = Literal["hps", "hpsv2", "pickscore", "aesthetic", "clip"]


class ConfigError(Exception):
    """The configuration is invalid; the message names the setting and never its value."""


class Section(BaseModel):
    model_config = {"extra": "forbid"}


class DiscordSettings(Section):
    token: SecretStr | None = Field(None, description="Bot token (secret).")
    guild_ids: list[int] = Field(
        default_factory=list,
        description="Guilds the command tree is synced to on start (fast); empty = global sync.",
    )
    channel_ids: list[int] = Field(
        default_factory=list, description="Channels where /dream is allowed; empty = any channel."
    )
    maintainer_role_ids: list[int] = Field(
        default_factory=list, description="Roles allowed to run maintainer commands."
    )
    log_channel_id: int | None = Field(
        None, description="Channel where training and promotion outcomes are posted."
    )
    api_base_url: str | None = Field(
        None, description="REST base URL override (an API proxy, or a local test server)."
    )
    gateway_url: str | None = Field(None, description="Gateway websocket URL override.")
    shard_count: int | None = Field(None, ge=1, description="Shards; empty = Discord's advice.")
    dream_in_dms: bool = Field(
        False,
        description="Allow /dream and /score in direct messages with the bot, outside every "
        "server's moderation (off: servers only; /stats and /forget-me work anywhere).",
    )


class BotSettings(Section):
    """How the Discord bot behaves (not what users may do: that is `limits`)."""

    sync_commands: bool = Field(
        True, description="Sync the slash commands to Discord on start (guild_ids, or globally)."
    )
    guild_ready_timeout: float = Field(
        2.0, ge=0, le=60, description="Seconds to wait for guild data at start before ready."
    )
    pool_size: int = Field(10, ge=2, le=100, description="Database connections the bot keeps.")
    click_timeout_seconds: float = Field(
        2.5,
        gt=0,
        le=3,
        description="Longest a click waits for the database (Discord wants an answer in 3 s).",
    )
    clicks_in_flight: int = Field(
        128,
        ge=1,
        le=100_000,
        description="Clicks one bot process handles at once; beyond, a click is answered "
        '"busy, please click again" at once and nothing is written (admission control).',
    )
    http_connections: int = Field(
        100,
        ge=0,
        description="HTTP connections to Discord at most (0 = no bound); more requests queue.",
    )
    score_timeout_seconds: float = Field(
        120, gt=0, le=840, description="Longest /score waits for a worker before giving up."
    )
    score_per_minute: int = Field(3, ge=1, description="/score commands one user may run a minute.")


class LimitSettings(Section):
    rounds_per_hour: int = Field(10, ge=0, description="Rounds one user may start per hour.")
    rounds_in_flight: int = Field(2, ge=0, description="Rounds of one user queued or generating.")
    rounds_per_week: int = Field(200, ge=0, description="Rounds one user may start per 7 days.")
    prompt_max_length: int = Field(500, ge=1, le=4000, description="Longest prompt accepted.")
    banned_terms: list[str] = Field(
        default_factory=list, description="Case-insensitive terms a prompt may not contain."
    )
    round_ttl_minutes: int = Field(
        24 * 60, ge=1, description="Minutes after which a ready round closes to new clicks."
    )
    others_may_vote: bool = Field(True, description="Users other than the requester may vote.")
    queued_round_minutes: int = Field(
        60,
        ge=0,
        description="A round no worker started within this many minutes fails, saying so, and "
        "frees its requester's in-flight slot (0 = rounds wait forever).",
    )
    score_max_images: int = Field(4, ge=1, le=10, description="Images per /score.")
    score_max_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Bytes per scored image.")
    score_max_pixels: int = Field(
        4096 * 4096, ge=64 * 64, description="Pixels per scored image (decompression bombs)."
    )


class GenerationSettings(Section):
    sd_model: str = Field(
        "CompVis/stable-diffusion-v1-4",
        description="Base text-to-image pipeline: a hub id or a local folder (diffusers layout).",
    )
    images_per_round: int = Field(4, ge=2, le=8, description="Images (K) shown per round.")
    steps: int = Field(50, ge=1, le=500, description="Denoising steps.")
    guidance_scale: float = Field(7.5, ge=0, description="Classifier-free guidance scale.")
    width: int = Field(512, ge=64, le=2048, multiple_of=8, description="Image width (square).")
    height: int = Field(512, ge=64, le=2048, multiple_of=8, description="Image height (square).")
    safety_checker: bool = Field(
        True,
        description="Check every image for NSFW content: flagged images are never posted.",
    )
    safety_checker_model: str | None = Field(
        "CompVis/stable-diffusion-safety-checker",
        description="The checker run on the images of a model that ships none (SD 2.x, SDXL): "
        "a hub id or local folder of a StableDiffusionSafetyChecker and its preprocessor "
        "(the one SD 1.x ships); empty = such models are refused while safety_checker is on.",
    )
    post_grid: bool = Field(False, description="Also post a grid of the round's images.")
    ab_share: float = Field(
        0.5,
        ge=0,
        le=1,
        description="Share of rounds that mix the serving model half/half with an adapter in "
        "testing (when one is).",
    )
    batch_rounds: int = Field(
        4, ge=1, le=16, description="Queued rounds with equal parameters generated in one call."
    )
    dtype: Literal["auto", "float16", "bfloat16", "float32"] = Field(
        "auto", description="Weights' dtype: auto = float16 on a GPU, float32 on the CPU."
    )
    channels_last: bool = Field(True, description="channels-last UNet/VAE memory on a GPU.")
    torch_compile: bool = Field(
        False, description="torch.compile the UNet on a GPU (slow first round, faster after)."
    )

    @model_validator(mode="after")
    def _ab_rounds_split_evenly(self) -> GenerationSettings:
        # A/B rounds show as many images of each version (`pipeline.serving`): one win per
        # round is only fair then.
        if self.ab_share > 0 and self.images_per_round % 2:
            raise ValueError(
                "generation.images_per_round (HPS_GENERATION__IMAGES_PER_ROUND) must be even "
                "while generation.ab_share (HPS_GENERATION__AB_SHARE) is above 0: A/B rounds "
                "show as many images of each version"
            )
        return self


class ModelSettings(Section):
    hps_arch: str = Field(
        "ViT-L-14", description="open_clip architecture name or model-config JSON path."
    )
    hps_pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag or weights file for the base CLIP."
    )
    hps_checkpoint: Path | None = Field(
        None, description="Fine-tuned HPS weights (the paper's hpc.pth, or one of ours)."
    )
    device: str = Field("auto", description="Torch device: auto, cpu, cuda, cuda:1, ...")


class TrainSettings(Section):
    """Defaults of `hps train` and the train_classifier job (the paper's recipe)."""

    choosers: Literal["requester", "all"] = Field(
        "requester", description="Whose choices train: the requester's only (as HPD), or all."
    )
    include_contains_name: bool = Field(
        False, description="Train on prompts flagged as naming people (HPD's contain_name)."
    )
    val_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="Share of prompts (by hash) held out for validation."
    )
    test_fraction: float = Field(
        0.1, ge=0, lt=0.5, description="Share of prompts (by hash) held out for the test split."
    )
    image_blocks: int = Field(
        10, ge=0, description="Trainable last blocks of the image tower (+ its final norm, proj)."
    )
    text_blocks: int = Field(
        6, ge=0, description="Trainable last blocks of the text tower (+ its final norm, proj)."
    )
    learning_rate: float = Field(1.7e-5, gt=0, description="AdamW learning rate.")
    weight_decay: float = Field(3.1e-3, ge=0, description="AdamW weight decay.")
    batch_size: int = Field(5, ge=1, description="Examples (prompt + its K images) per step.")
    grad_accumulation: int = Field(1, ge=1, description="Batches per optimizer step.")
    epochs: int = Field(1, ge=1, description="Passes over the training split.")
    warmup_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of steps of linear warm-up before cosine decay."
    )
    grad_clip: float = Field(1.0, gt=0, description="Gradient norm clip.")
    patience: int = Field(
        2, ge=1, description="Epochs without a better validation accuracy before stopping."
    )
    resize_mode: Literal["longest", "shortest", "squash"] = Field(
        "longest",
        description="Image preprocessing of trained models: longest = resize the longest side "
        "and zero-pad (the paper's training); shortest = resize and centre-crop (CLIP's default).",
    )
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 (or fp16) on a GPU, fp32 on the CPU."
    )
    num_workers: int = Field(2, ge=0, description="Image-decoding worker processes.")
    seed: int = Field(42, description="Seed of shuffling and initialisation.")
    min_examples: int = Field(
        200, ge=1, description="The train_classifier job skips training below this many examples."
    )
    promote_margin: float = Field(
        0.005,
        ge=0,
        le=1,
        description="Top-1 accuracy a new classifier must gain over the serving one to serve.",
    )


class AdaptSettings(Section):
    """The SD adaptation (`hps adapt`, the adapt_sd job): the paper's align_sd recipe, or
    Diffusion-DPO on the community's pairs (`recipe`). Training defaults are the paper's
    reference run (tgxs002/align_sd, scripts/train_lora.sh); the `dpo_*` fields are
    Diffusion-DPO's own, the others (LoRA, optimizer, batch, precision, evaluation) serve
    both recipes."""

    recipe: Literal["hps", "dpo"] = Field(
        "hps",
        description="What `hps adapt run`, /retrain sd and the schedule run: hps = the paper's "
        "recipe (generate, score with HPS, label, fine-tune); dpo = Diffusion-DPO on people's "
        "pairs (pick vs each other image of its round).",
    )
    # Prompts.
    max_prompts: int = Field(
        5000, ge=1, description="Training prompts sampled from those people used (+ prompt_file)."
    )
    prompt_file: Path | None = Field(
        None, description="Extra prompts: a text file (one per line) or a JSON list of strings."
    )
    include_contains_name: bool = Field(
        False, description="Also use prompts flagged as naming people."
    )
    heldout_fraction: float = Field(
        0.05,
        gt=0,
        lt=0.5,
        description="Share of prompts (by hash) held out for offline evaluation, never trained on.",
    )
    min_prompts: int = Field(
        50, ge=1, description="The adapt_sd job skips (saying why) below this many prompts."
    )
    # Sampling, scoring and labelling.
    images_per_prompt: int = Field(
        4, ge=4, le=64, description="Images generated per prompt (the rule needs 4 sharp ones)."
    )
    sample_batch: int = Field(
        16, ge=1, le=512, description="Images per pipeline call when sampling and evaluating."
    )
    blur_threshold: float = Field(
        10.0,
        ge=0,
        description="An image is blurry if no two adjacent pixels (across or down) differ by this.",
    )
    label_factor: float = Field(
        2.0,
        gt=0,
        description="Top (bottom) image is positive (negative) if its softmax share > factor/n.",
    )
    identifier: str = Field(
        "Weird image. ",
        min_length=1,
        description="Prefix of non-preferred images' prompts; the adapter's negative prompt.",
    )
    regularization_data: Path | None = Field(
        None,
        description="Images with their own captions (the paper: LAION-aesthetics >= 6.5): a "
        "folder with metadata.jsonl, or a JSONL file, of {file_name, caption}.",
    )
    regularization_max: int = Field(
        0, ge=0, description="Regularization images used at most (0 = all)."
    )
    # LoRA fine-tuning of the UNet.
    rank: int = Field(
        4, ge=1, le=1024, description="LoRA rank (the script's default; a summary says 32)."
    )
    resolution: int = Field(
        512,
        ge=8,
        le=2048,
        multiple_of=8,
        description="Training pixels: 512 for SD 1.x, 1024 for an SDXL base (a DPO run on SDXL "
        "below the resolution it generates at is refused).",
    )
    center_crop: bool = Field(False, description="Centre crop instead of random crop.")
    random_flip: bool = Field(False, description="Random horizontal flips.")
    total_batch_size: int = Field(
        40, ge=1, description="Examples per optimizer step, over devices and accumulation."
    )
    batch_size: int = Field(
        8, ge=1, description="Examples per device per forward pass (accumulated to the total)."
    )
    learning_rate: float = Field(1e-5, gt=0, description="AdamW learning rate.")
    lr_scheduler: Literal["constant", "constant_with_warmup", "linear", "cosine"] = Field(
        "constant", description="Learning-rate schedule (diffusers' get_scheduler)."
    )
    lr_warmup_steps: int = Field(0, ge=0, description="Warm-up steps of the schedule.")
    max_train_steps: int = Field(10_000, ge=1, description="Optimizer steps.")
    adam_beta1: float = Field(0.9, ge=0, lt=1, description="AdamW beta1.")
    adam_beta2: float = Field(0.999, ge=0, lt=1, description="AdamW beta2.")
    weight_decay: float = Field(1e-2, ge=0, description="AdamW weight decay.")
    adam_epsilon: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    max_grad_norm: float = Field(1.0, gt=0, description="Gradient norm clip.")
    prompt_dropout: float = Field(
        0.0, ge=0, le=1, description="Share of captions replaced by the empty prompt."
    )
    seed: int = Field(42, description="Seed of sampling, shuffling and initialisation.")
    mixed_precision: Literal["auto", "no", "fp16", "bf16"] = Field(
        "auto", description="auto = bf16 (or fp16) on a GPU, fp32 on the CPU."
    )
    gradient_checkpointing: bool = Field(False, description="Trade compute for UNet memory.")
    use_ema: bool = Field(False, description="Keep an EMA of the LoRA weights and save that.")
    ema_decay: float = Field(0.9999, gt=0, lt=1, description="EMA decay (diffusers' EMAModel).")
    checkpointing_steps: int = Field(
        500, ge=1, description="Steps between resumable checkpoints (and validation images)."
    )
    checkpoints_total_limit: int = Field(2, ge=1, description="Checkpoints kept.")
    validation_prompts: list[str] = Field(
        default_factory=lambda: ["a photo of a cat on a sofa", "a lighthouse on a cliff at dusk"],
        description="Prompts drawn at each checkpoint: as is, prefixed with the identifier, "
        "and with the identifier as negative prompt.",
    )
    validation_images: int = Field(2, ge=0, description="Images per validation prompt and variant.")
    num_workers: int = Field(2, ge=0, description="Image-decoding worker processes.")
    # Diffusion-DPO (`recipe = dpo`).
    dpo_beta: float = Field(
        5000.0,
        gt=0,
        description="Diffusion-DPO's beta (train.py's --beta_dpo): how far the adapter may move "
        "from the base model (its reference: adapters are not stacked); the loss is "
        "-log sigmoid(-beta/2 * (winner's and loser's MSE gain)).",
    )
    dpo_choosers: Literal["requester", "all"] = Field(
        "requester",
        description="Whose picks make pairs: the requester's only (as HPD), or everyone's.",
    )
    dpo_max_pairs: int = Field(
        0, ge=0, description="Training pairs used at most (0 = all): a seeded sample."
    )
    dpo_min_pairs: int = Field(
        100, ge=1, description="The adapt_sd job skips (saying why) below this many training pairs."
    )
    dpo_heldout_pairs: int = Field(
        256,
        ge=0,
        description="Held-out pairs (never trained on) whose implicit accuracy is measured after "
        "training (the base's, the reference, is 0.5 by construction).",
    )
    dpo_latent_cache: bool = Field(
        False,
        description="Encode each image with the VAE once (centre-cropped; both orientations "
        "with random_flip; a loser of another size than its winner resized to the winner's "
        "first, as without the cache) and train on the cached latents; needs center_crop.",
    )
    # Offline evaluation: the gate to live testing.
    eval_prompts: int = Field(200, ge=1, description="Held-out prompts used at most.")
    eval_seeds: int = Field(2, ge=1, description="Paired images per held-out prompt.")
    offline_gate: Literal["win_rate", "hps_gain", "none"] = Field(
        "win_rate",
        description="What admits an adapter to live testing: the 95% lower bound of its paired "
        "win rate above offline_min_win_rate, or its mean HPS gain above offline_min_hps_gain.",
    )
    offline_min_win_rate: float = Field(0.5, ge=0, lt=1, description="See offline_gate.")
    offline_min_hps_gain: float = Field(0.0, description="See offline_gate (HPS points).")
    offline_scorers: list[ScorerName] = Field(
        default_factory=list,
        description="Reward models that also judge the held-out pairs, beside the serving HPS "
        "classifier (hps): hpsv2, pickscore, aesthetic, clip (weights: the scorers settings). "
        "Each one listed is required: the offline evaluation fails, naming this setting, if "
        "its weights cannot be loaded.",
    )
    offline_gate_scorer: Literal["auto", "hps", "hpsv2", "pickscore", "aesthetic", "clip"] = Field(
        "auto",
        description="A scorer that must agree (its paired win rate's 95% lower bound above "
        "offline_min_win_rate) besides the offline_gate: one of offline_scorers, or hps "
        "(no other judge); auto = the first of offline_scorers other than hps, else hps.",
    )
    # Live A/B measurement: a group-sequential test (`pipeline.adapt.live`).
    min_live_rounds: int = Field(
        200,
        ge=1,
        description="Decided A/B rounds between two planned looks of the live test (the "
        "first look is at this many).",
    )
    max_live_rounds: int = Field(
        1000,
        ge=0,
        description="The last planned look: retire as inconclusive when no look decided by "
        "then; max_live_rounds // min_live_rounds looks in all (0 = one look).",
    )
    live_confidence: float = Field(
        0.95,
        gt=0.5,
        lt=1,
        description="Confidence of the live test over all its looks (Bonferroni: each look "
        "uses 1 - (1 - this) / looks).",
    )
    max_live_days: float = Field(
        28,
        ge=0,
        description="Retire as inconclusive after this many days in testing (0 = no limit).",
    )

    @model_validator(mode="after")
    def _latent_cache_needs_a_fixed_crop(self) -> AdaptSettings:
        if self.dpo_latent_cache and not self.center_crop:
            raise ValueError(
                "adapt.dpo_latent_cache (HPS_ADAPT__DPO_LATENT_CACHE) needs adapt.center_crop "
                "(HPS_ADAPT__CENTER_CROP): cached latents are of one crop of each image"
            )
        return self

    @model_validator(mode="after")
    def _gate_scorer_judges(self) -> AdaptSettings:
        gate = self.offline_gate_scorer
        if gate not in ("auto", "hps") and gate not in self.offline_scorers:
            raise ValueError(
                f"adapt.offline_gate_scorer (HPS_ADAPT__OFFLINE_GATE_SCORER) is {gate}, which "
                "adapt.offline_scorers (HPS_ADAPT__OFFLINE_SCORERS) does not list: add it there"
            )
        return self

    @model_validator(mode="after")
    def _looks_fit(self) -> AdaptSettings:
        if 0 < self.max_live_rounds < self.min_live_rounds:
            raise ValueError(
                "adapt.max_live_rounds (HPS_ADAPT__MAX_LIVE_ROUNDS) must be at least "
                "adapt.min_live_rounds (HPS_ADAPT__MIN_LIVE_ROUNDS), the first look"
            )
        return self


class ScorerSettings(Section):
    """Where each reward model's weights come from (`hps eval --scorers`, the adaptation's
    `offline_scorers`): a local file or folder, or a Hugging Face hub id (a file on the hub:
    `owner/repo/file`), fetched into the hub cache the first time a scorer is used."""

    hpsv2_arch: str = Field(
        "ViT-H-14", description="open_clip architecture (or model-config JSON) of HPS v2."
    )
    hpsv2_checkpoint: str = Field(
        "xswu/HPSv2/HPS_v2.1_compressed.pt",
        description="HPS v2 weights ({'state_dict': ...}): HPS_v2.1_compressed.pt (v2.1) or "
        "HPS_v2_compressed.pt (v2.0), a local file or hub file.",
    )
    pickscore_model: str = Field(
        "yuvalkirstain/PickScore_v1", description="PickScore: a transformers CLIPModel."
    )
    pickscore_processor: str = Field(
        "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
        description="PickScore's processor (tokenizer and image preprocessing), as its README.",
    )
    aesthetic_checkpoint: str = Field(
        "trl-lib/ddpo-aesthetic-predictor/aesthetic-model.pth",
        description="LAION aesthetic predictor v2 MLP (improved-aesthetic-predictor's "
        "sac+logos+ava1-l14-linearMSE.pth; the default is its hub mirror).",
    )
    aesthetic_clip: str = Field(
        "ViT-L-14", description="The aesthetic predictor's CLIP: an open_clip architecture."
    )
    aesthetic_clip_pretrained: str = Field(
        "openai", description="Its pretrained tag or weights file (OpenAI's ViT-L/14)."
    )
    clip_model: str = Field(
        "openai/clip-vit-large-patch14",
        description="CLIP score's model (transformers CLIPModel + CLIPProcessor; torchmetrics' "
        "default).",
    )


class ScheduleSettings(Section):
    timezone: str = Field("UTC", description="Time zone of the cron expressions.")
    retrain_classifier: str | None = Field(
        "0 3 * * *", description="Cron of classifier retraining; empty = off."
    )
    retrain_min_new_choices: int = Field(
        500, ge=0, description="Retrain only when this many new choices arrived since last time."
    )
    adapt_sd: str | None = Field(
        None,
        description="Cron of SD re-adaptation (hours of GPU time per run), e.g. 0 4 * * 0 for "
        "Sundays at 04:00; empty (the default) = off: run it with /retrain sd or hps adapt run.",
    )
    close_stale_rounds: str | None = Field(
        "*/5 * * * *",
        description="Cron of closing rounds past their TTL and failing rounds no worker "
        "started in time (limits.queued_round_minutes); empty = off.",
    )
    requeue_expired_jobs: str | None = Field(
        "* * * * *",
        description="Cron of taking back the jobs whose worker stopped heartbeating (their "
        "lease expired): requeued, or dead-lettered when their attempts are spent (a "
        "generate job's round then fails), even while no other worker runs; empty = off.",
    )
    review_adapters: str | None = Field(
        "*/10 * * * *",
        description="Cron of the live review of adapters in A/B testing; empty = off.",
    )
    score_images: str | None = Field(
        "*/10 * * * *",
        description="Cron of scoring served images with the serving HPS model; empty = off.",
    )
    score_images_batch: int = Field(
        2000, ge=1, description="Images one score_images job scores at most."
    )


class WorkerSettings(Section):
    kinds: list[str] = Field(
        default_factory=lambda: [
            "generate",
            "score",
            "score_images",
            "train_classifier",
            "adapt_sd",
        ],
        description="Job kinds this worker takes.",
    )
    lease_seconds: int = Field(
        120, ge=5, description="A job whose worker misses heartbeats this long is taken again."
    )
    heartbeat_seconds: int = Field(20, ge=1, description="Seconds between heartbeats.")
    poll_seconds: float = Field(5.0, gt=0, description="Poll interval when no NOTIFY arrives.")
    concurrency: int = Field(1, ge=1, le=64, description="Jobs one worker runs at once.")
    backoff_seconds: float = Field(
        10.0, ge=0, description="Retry delay after a failure, doubled at each further attempt."
    )
    shutdown_grace_seconds: float = Field(
        300.0,
        ge=0,
        description="On SIGTERM, how long jobs in hand may run on before they are released.",
    )

    @model_validator(mode="after")
    def _heartbeat_within_lease(self) -> WorkerSettings:
        if self.heartbeat_seconds * 2 > self.lease_seconds:
            raise ValueError("heartbeat_seconds must be at most half of lease_seconds")
        return self


AWS_SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN")


class StoreSettings(Section):
    """Where images and model versions live: this machine's data_dir (the default), or an
    S3-compatible object store shared by machines that share no folder."""

    url: str = Field(
        "",
        description="Empty = data_dir on this machine; a folder path; or s3://bucket/prefix "
        "(AWS S3, MinIO, Cloudflare R2, ...).",
    )
    endpoint_url: str | None = Field(
        None, description="The S3 API's URL (e.g. http://minio:9000); empty = AWS."
    )
    region: str = Field("us-east-1", description="The bucket's region.")
    access_key_id: str | None = Field(
        None, description="S3 access key id; empty = AWS_* variables or the instance's role."
    )
    secret_access_key: SecretStr | None = Field(None, description="S3 secret key (secret).")
    session_token: SecretStr | None = Field(
        None, description="S3 session token of temporary credentials (secret)."
    )
    cache_dir: Path | None = Field(
        None,
        description="Where model versions fetched from an object store are cached; "
        "empty = data_dir/cache.",
    )
    cache_max_gib: float = Field(
        50.0, gt=0, description="Size of the model cache; the least recently used go first."
    )
    upload_timeout_seconds: float = Field(
        8.0,
        gt=0,
        description="An image's upload (retries included) gives up after this long, so a "
        "store that hangs cannot hold a round's transaction; raise it for a slow link.",
    )

    @field_validator("url")
    @classmethod
    def _store_url(cls, value: str) -> str:
        value = value.strip()
        if "://" not in value:
            return value  # empty (data_dir) or a folder
        scheme, _, rest = value.partition("://")
        if scheme == "file":
            return value
        if scheme != "s3":
            raise ValueError("must be empty, a folder, or s3://bucket/prefix")
        bucket = rest.partition("/")[0]
        if "@" in bucket or ":" in bucket:
            raise ValueError(
                "must not hold credentials: set store.access_key_id and "
                "store.secret_access_key instead"
            )
        if not re.fullmatch(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]", bucket):
            raise ValueError("names no valid bucket: s3://bucket/prefix (3-63 of a-z 0-9 . -)")
        return value.rstrip("/")

    @field_validator("endpoint_url")
    @classmethod
    def _endpoint_url(cls, value: str | None) -> str | None:
        value = (value or "").strip()
        if not value:
            return None
        scheme, sep, rest = value.partition("://")
        if not sep or scheme not in ("http", "https"):
            raise ValueError("must be an http:// or https:// URL, e.g. https://minio.example")
        # Credentials in it would be shown in every message naming the store: refused.
        if "@" in rest.partition("/")[0]:
            raise ValueError(
                "must not hold credentials: set store.access_key_id and "
                "store.secret_access_key instead"
            )
        return value.rstrip("/")

    @property
    def is_s3(self) -> bool:
        return self.url.startswith("s3://")


class HealthSettings(Section):
    """Liveness of the bot and the scheduler (workers: `worker.heartbeat_seconds` and
    `worker.lease_seconds`), read by `hps health` and `/status`."""

    heartbeat_seconds: float = Field(
        15, gt=0, description="Seconds between the bot's and the scheduler's heartbeats."
    )
    stale_seconds: float = Field(
        60, gt=0, description="A bot or scheduler whose last heartbeat is older is not alive."
    )

    @model_validator(mode="after")
    def _beats_within_staleness(self) -> HealthSettings:
        if self.heartbeat_seconds * 2 > self.stale_seconds:
            raise ValueError("heartbeat_seconds must be at most half of stale_seconds")
        return self


class AnalystSettings(Section):
    """Limits of the analysts' logins (members of `hps_analyst`), applied by `hps db upgrade`
    and `hps db analysts` (`db.analysts`). The timeouts are each login's defaults in this
    database: they stop a forgotten transaction or a runaway query, not a login that sets
    them off itself; the connection limit holds whatever the login does."""

    statement_timeout_seconds: int = Field(
        120, ge=1, description="An analyst's statement is cancelled after this long."
    )
    idle_in_transaction_seconds: int = Field(
        60, ge=1, description="An analyst's session idle inside a transaction this long ends."
    )
    lock_timeout_seconds: int = Field(
        5, ge=1, description="An analyst's statement waits this long for a lock at most."
    )
    connection_limit: int = Field(
        4, ge=1, le=1000, description="Connections one analyst login may hold at once."
    )


def _toml_path() -> Path | None:
    """`HPS_CONFIG`'s file; `HPS_CONFIG=` (empty) means no file at all, not even
    `./hps.toml`; unset means `./hps.toml` if present."""
    configured = os.environ.get(f"{ENV_PREFIX}CONFIG")
    if configured is not None and not configured.strip():
        return None
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ConfigError(f"{ENV_PREFIX}CONFIG: no such file: {path}")
        return path
    return DEFAULT_CONFIG_FILE if DEFAULT_CONFIG_FILE.is_file() else None


def _env_file_path() -> Path | None:
    """`HPS_ENV_FILE`'s file; `HPS_ENV_FILE=` (empty) means no env file at all, not even
    `./.env`; unset means `./.env` if present."""
    configured = os.environ.get(f"{ENV_PREFIX}ENV_FILE")
    if configured is not None and not configured.strip():
        return None
    if configured:
        path = Path(configured)
        if not path.is_file():
            raise ConfigError(f"{ENV_PREFIX}ENV_FILE: no such file: {path}")
        return path
    return DEFAULT_ENV_FILE if DEFAULT_ENV_FILE.is_file() else None


class Settings(BaseSettings):
    """Everything configurable. Secrets are `SecretStr` and never printed."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=NESTED_DELIMITER,
        extra="forbid",
        validate_default=True,
    )

    database_url: SecretStr | None = Field(
        None,
        description="PostgreSQL URL (may hold a password); empty = embedded server in data_dir.",
    )
    data_dir: Path = Field(
        Path("data"), description="Image store, models, runs and the embedded PostgreSQL."
    )
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    log_format: Literal["text", "json"] = Field("text", description="json for log shippers.")

    discord: DiscordSettings = Field(default_factory=DiscordSettings)
    bot: BotSettings = Field(default_factory=BotSettings)
    limits: LimitSettings = Field(default_factory=LimitSettings)
    generation: GenerationSettings = Field(default_factory=GenerationSettings)
    models: ModelSettings = Field(default_factory=ModelSettings)
    train: TrainSettings = Field(default_factory=TrainSettings)
    adapt: AdaptSettings = Field(default_factory=AdaptSettings)
    scorers: ScorerSettings = Field(default_factory=ScorerSettings)
    schedules: ScheduleSettings = Field(default_factory=ScheduleSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    store: StoreSettings = Field(default_factory=StoreSettings)
    health: HealthSettings = Field(default_factory=HealthSettings)

    analysts: AnalystSettings = Field(default_factory=AnalystSettings)

    @field_validator("database_url", mode="before")
    @classmethod
    def _empty_url_is_embedded(cls, value: Any) -> Any:
        """`HPS_DATABASE_URL=` (empty) means the embedded server, as no URL does."""
        return None if isinstance(value, str) and not value.strip() else value

    @field_validator("database_url")
    @classmethod
    def _postgresql_url(cls, value: SecretStr | None) -> SecretStr | None:
        # The messages never quote the URL: it may hold a password.
        if value is None:
            return None
        url = value.get_secret_value()
        scheme = url.partition("://")[0] if "://" in url else ""
        if scheme not in ("postgresql", "postgres"):
            raise ValueError(
                "must be a URL like postgresql://user:password@host:5432/database "
                "(or empty for the embedded server)"
            )
        parts = _userinfo(url)
        if parts is not None and any(c in f"{parts[1]}:{parts[2]}" for c in "/?#[]"):
            raise ValueError(
                "has a user name or password with / ? # [ or ] in it: write them "
                "percent-encoded (%2F %3F %23 %5B %5D)"
            )
        try:
            urlsplit(url).port  # noqa: B018 (parsing it raises for a bad port)
        except ValueError:
            raise ValueError("has a port that is not a number from 0 to 65535") from None
        return value

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        env_file = _env_file_path()
        if env_file is not None:
            # Its HPS_* names only (unknown ones are refused by `load_settings`).
            sources.append(
                DotEnvSettingsSource(
                    settings_cls, env_file=env_file, dotenv_filtering="only_existing"
                )
            )
        path = _toml_path()
        if path is not None:
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
        return tuple(sources)

    # Paths below data_dir, one place for each.
    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def models_dir(self) -> Path:
        return self.data_dir / "models"

    @property
    def runs_dir(self) -> Path:
        return self.data_dir / "runs"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @property
    def store_folder(self) -> Path | None:
        """The folder the store keeps its objects in (images/, models/), None for S3."""
        url = self.store.url
        if self.store.is_s3:
            return None
        if not url:
            return self.data_dir
        return Path(url.removeprefix("file://"))

    @property
    def cache_dir(self) -> Path:
        """Where model versions (and training's images) fetched from an object store are
        cached on this machine."""
        return self.store.cache_dir or self.data_dir / "cache"

    def with_changes(self, section: str, **changes: Any) -> Settings:
        """A copy with keys of one section replaced (None keeps a key), validated like
        the file's values; raises pydantic's ValidationError."""
        current = getattr(self, section)
        values = {**current.model_dump(), **{k: v for k, v in changes.items() if v is not None}}
        return self.model_copy(update={section: type(current).model_validate(values)})

    def secret_values(self) -> list[str]:
        """Every secret's plain value, for the log redaction filter."""
        values = []
        if self.discord.token is not None:
            values.append(self.discord.token.get_secret_value())
        if self.database_url is not None:
            url = self.database_url.get_secret_value()
            password = _url_password(url) or ""
            values += [password, unquote(password)]
            values.extend(parse_qs(urlsplit(url).query).get("password", []))  # libpq's ?password=
        for secret in (self.store.secret_access_key, self.store.session_token):
            if secret is not None:
                values.append(secret.get_secret_value())
        # Without store.* keys the S3 client reads these from the environment.
        values += [os.environ.get(name, "") for name in AWS_SECRET_VARIABLES]
        # The Hugging Face hub's token (gated or private models), which the hub library
        # reads from the environment itself.
        values += [os.environ.get(name, "") for name in HF_TOKEN_VARS]
        return list(dict.fromkeys(v for v in values if v))

    def redacted(self) -> dict[str, Any]:
        """The settings as plain data with every secret replaced, for `hps config show`."""
        data = self.model_dump(mode="json")
        data["database_url"] = (
            redact_url(self.database_url.get_secret_value()) if self.database_url else None
        )
        data["discord"]["token"] = "********" if self.discord.token else None
        for key in ("secret_access_key", "session_token"):
            data["store"][key] = "********" if getattr(self.store, key) else None
        return data


def _userinfo(url: str) -> tuple[str, str, str | None, str] | None:
    """`(scheme://, user, password, after @)` of a URL with a user part. The user part ends
    at the last `@`, so a password with an unescaped `/`, `#` or `?` (which libpq refuses,
    but a person may well write) is still found whole."""
    scheme, sep, rest = url.partition("://")
    at = rest.rfind("@")
    if not sep or at < 0:
        return None
    user, colon, password = rest[:at].partition(":")
    return scheme + sep, user, password if colon else None, rest[at + 1 :]


def _url_password(url: str) -> str | None:
    parts = _userinfo(url)
    return parts[2] if parts else None


def redact_url(url: str) -> str:
    """The URL with its password (in the user part, or libpq's `?password=`) as `***`."""
    parts = _userinfo(url)
    if parts is not None and parts[2] is not None:
        prefix, user, _, rest = parts
        url = f"{prefix}{user}:***@{rest}"
    return re.sub(r"([?&])password=[^&#]*", r"\1password=***", url)


def _setting_name(loc: tuple[Any, ...]) -> str:
    keys = [str(part) for part in loc if not isinstance(part, int)]
    env = ENV_PREFIX + NESTED_DELIMITER.join(key.upper() for key in keys)
    return f"{env} ({'.'.join(keys)})"


# The environment variables huggingface_hub reads its token from (redacted in logs).
HF_TOKEN_VARS = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN")

# HPS_* variables that are not settings but are read elsewhere.
OTHER_ENV_VARS = {f"{ENV_PREFIX}CONFIG", f"{ENV_PREFIX}ENV_FILE", f"{ENV_PREFIX}TEST_DATABASE_URL"}


def known_env_vars() -> set[str]:
    """Every environment variable name that sets a setting."""
    names = set(OTHER_ENV_VARS)
    for name, info in Settings.model_fields.items():
        env = ENV_PREFIX + name.upper()
        names.add(env)
        section = info.annotation
        if isinstance(section, type) and issubclass(section, Section):
            names.update(f"{env}{NESTED_DELIMITER}{key.upper()}" for key in section.model_fields)
    return names


def _unknown_env_vars() -> list[str]:
    known = known_env_vars()
    names = list(os.environ)
    env_file = _env_file_path()
    if env_file is not None:
        from dotenv import dotenv_values

        names += [f"{name} (in {env_file})" for name in dotenv_values(env_file)]
    return sorted(
        k
        for k in names
        if k.upper().startswith(ENV_PREFIX) and k.split(" ")[0].upper() not in known
    )


def load_settings(**overrides: Any) -> Settings:
    """Read and validate the settings; raise `ConfigError` naming each bad setting.

    An unknown `HPS_*` variable is an error too: a typo would otherwise be ignored silently.
    """
    unknown = _unknown_env_vars()
    if unknown:
        raise ConfigError(f"unknown setting(s): {', '.join(unknown)} (see `hps config show`)")
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        # Never echo the input: it may be a secret.
        problems = [f"{_setting_name(err['loc'])}: {err['msg']}" for err in exc.errors()]
        raise ConfigError("invalid configuration:\n  " + "\n  ".join(problems)) from None
    except ValueError as exc:  # malformed TOML, or a complex value that is not JSON
        raise ConfigError(f"invalid configuration: {exc}") from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings, read once."""
    return load_settings()
