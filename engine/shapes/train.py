"""The training recipe of the embedded default model (``cfgswitch train-shapes``).

Two phases, seeded: (1) a KL autoencoder on rendered scenes; (2) a CLIP-style text encoder
(from scratch, causal attention, CLIP's tokenizer) jointly with a cross-attention UNet,
epsilon prediction on Stable Diffusion's scaled-linear schedule, captions dropped at
``uncond_prob`` for classifier-free guidance, EMA weights saved. The output is a standard
diffusers folder (safetensors, ``tokenizer/`` included).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..tiny_model import SD_SCHEDULER_CONFIG
from ..tokenizer import load_clip_tokenizer
from .captions import sample_captioned
from .train_data import RenderedImages, unet_batches, unet_step_count, used_indices, vae_batches
from .train_data import sample_timesteps  # noqa: F401 - the recipe's timestep rule, imported from here too
from .world import IMAGE_SIZE

logger = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """Everything that decides the trained weights (with the code)."""

    seed: int = 0
    train_images: int = 12000
    # autoencoder
    vae_channels: Tuple[int, ...] = (16, 32, 64)
    vae_norm_groups: int = 4  # channels per group >= 4: GroupNorm with one channel per group erases colour
    vae_steps: int = 2000
    vae_batch: int = 16
    vae_crop: int = 32  # trained on random crops (it is convolutional): 4x cheaper steps
    vae_lr: float = 1e-3
    vae_kl_weight: float = 1e-6
    # text encoder
    text_hidden: int = 64
    text_layers: int = 2
    text_heads: int = 4
    text_ffn: int = 256
    # unet
    unet_channels: Tuple[int, ...] = (32, 64, 64)
    unet_heads: int = 4
    unet_norm_groups: int = 8
    unet_steps: int = 12000
    batch: int = 32
    lr: float = 1e-3
    text_lr: float = 1e-3
    warmup: int = 100
    uncond_prob: float = 0.1
    offset_noise: float = 0.15  # per-channel constant added to the noise: flat backgrounds follow the text
    ema_decay: float = 0.997
    # Layout (colour, shape, position) is decided at high noise, where the epsilon loss hardly sees
    # the image: an error e in x0 costs only e^2 * SNR. Weighting a sample by clamp(1/SNR, 1, cap)
    # (the x0 loss there, the epsilon loss at low noise), normalised to mean 1 over t, gives the
    # text its gradient. 0 disables it (plain epsilon MSE).
    x0_weight_cap: float = 0.0
    t_power: float = 0.6  # timesteps drawn as 1000 * u**t_power: < 1 samples high noise more often
    # bookkeeping
    stop_at: int = 0  # >0: stop (and save) after this many UNet steps of the unet_steps schedule
    log_every: int = 50
    save_every: int = 2000
    eval_every: int = 1000
    eval_prompts: int = 48
    eval_steps: int = 15
    eval_seed: int = 777
    fp16: bool = True
    threads: int = 2  # fixed for reproducibility; 1 is faster on a CPU that other jobs keep busy
    device: str = "cpu"  # "cuda" trains on a GPU (random numbers still come from CPU generators)
    max_minutes: float = 0.0  # >0: stop (save and check) once the whole run has taken this long

    def latent_factor(self) -> int:
        return 2 ** (len(self.vae_channels) - 1)


def build_models(cfg: TrainConfig):
    """Fresh ``(vae, text_encoder, unet)`` with the recipe's architecture, seeded."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    n = len(cfg.vae_channels)
    torch.manual_seed(cfg.seed)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, block_out_channels=tuple(cfg.vae_channels),
        down_block_types=("DownEncoderBlock2D",) * n, up_block_types=("UpDecoderBlock2D",) * n,
        layers_per_block=1, norm_num_groups=cfg.vae_norm_groups, sample_size=IMAGE_SIZE,
    )
    torch.manual_seed(cfg.seed + 1)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        bos_token_id=49406, eos_token_id=49407, pad_token_id=49407, vocab_size=49408,
        hidden_size=cfg.text_hidden, intermediate_size=cfg.text_ffn, num_attention_heads=cfg.text_heads,
        num_hidden_layers=cfg.text_layers, max_position_embeddings=77, layer_norm_eps=1e-5,
    ))
    torch.manual_seed(cfg.seed + 2)
    m = len(cfg.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // cfg.latent_factor(), in_channels=4, out_channels=4,
        block_out_channels=tuple(cfg.unet_channels), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D",) * m, up_block_types=("CrossAttnUpBlock2D",) * m,
        cross_attention_dim=cfg.text_hidden, attention_head_dim=cfg.unet_heads, norm_num_groups=cfg.unet_norm_groups,
    )
    return vae, text_encoder, unet


def tokenize(captions: Sequence[str]) -> torch.Tensor:
    """``[N, 77]`` CLIP ids, padded as the Stable Diffusion pipeline pads them."""
    tok = load_clip_tokenizer()
    return tok(list(captions), padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def loss_weights(alphas_cumprod: torch.Tensor, cap: float) -> torch.Tensor:
    """Per-timestep weights of the epsilon loss: ``clamp(1/SNR, 1, cap)`` normalised to mean 1.

    ``cap <= 0`` gives all ones (plain epsilon MSE). With ``1/SNR = (1 - a) / a`` the weighted
    epsilon loss equals the x0 loss at high noise (up to ``cap``) and stays the epsilon loss
    where the image is already visible.
    """
    a = alphas_cumprod.double()
    if cap <= 0:
        return torch.ones_like(a, dtype=torch.float32)
    w = ((1 - a) / a).clamp(1.0, float(cap))
    return (w / w.mean()).float()


class _Ema:
    def __init__(self, modules: Sequence[torch.nn.Module], decay: float):
        self.decay = decay
        self.params = [p for m in modules for p in m.parameters()]
        self.shadow = [p.detach().clone() for p in self.params]

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        for s, p in zip(self.shadow, self.params):
            s.lerp_(p.detach(), 1 - d)

    @torch.no_grad()
    def swap(self) -> None:
        """Exchange live and averaged weights (call twice to restore)."""
        for s, p in zip(self.shadow, self.params):
            tmp = p.detach().clone()
            p.copy_(s)
            s.copy_(tmp)


def _lr_lambda(warmup: int, total: int) -> Callable[[int], float]:
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


class Trainer:
    """Runs the recipe into ``out``; ``log`` receives one dict per logged event."""

    def __init__(self, cfg: TrainConfig, out: Path, progress: bool = True):
        self.cfg, self.out, self.progress = cfg, Path(out), progress
        self.out.mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "train_log.jsonl"
        self.log_path.write_text("")
        self.t0 = time.perf_counter()
        self.history: List[Dict] = []

    def log(self, **event) -> None:
        """Append one event (with the elapsed seconds) to the history and ``train_log.jsonl``."""
        event["elapsed_s"] = round(time.perf_counter() - self.t0, 2)
        self.history.append(event)
        with self.log_path.open("a") as f:
            f.write(json.dumps(event) + "\n")

    # ----------------------------------------------------------------- phases
    def run(self) -> Path:
        """Render the data, train both phases, save; returns the diffusers folder ``OUT/model``."""
        cfg = self.cfg
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        np.random.seed(cfg.seed)
        (self.out / "train_config.json").write_text(json.dumps(asdict(cfg), indent=2))
        self.device = torch.device(cfg.device)
        self.vae, self.text_encoder, self.unet = (m.to(self.device) for m in build_models(cfg))
        pairs = sample_captioned(cfg.seed, cfg.train_images)
        self.scenes = [p[0] for p in pairs]
        # Render (and later encode) only the images the two phases will draw: all of them in a full
        # run, a few in a short one (train_data replays the training loops' own generators).
        self.latent_shape = (int(self.vae.config.latent_channels), IMAGE_SIZE // cfg.latent_factor(), IMAGE_SIZE // cfg.latent_factor())
        vae_used, self.unet_used = used_indices(cfg, self.latent_shape)
        images = RenderedImages(self.scenes, sorted(set(vae_used) | set(self.unet_used)), self.device)
        self.rendered_images = len(images)
        self.log(phase="data", rendered=len(images), encoded=len(self.unet_used), train_images=cfg.train_images)
        logger.info("rendered %d of %d training images (the images the run's steps draw)", len(images), cfg.train_images)
        self.ids = tokenize([p[1] for p in pairs]).to(self.device)
        self.empty_ids = tokenize([""])[0].to(self.device)
        self.train_vae(images)
        self.encode_latents(images)
        del images
        self.train_unet()
        return self.out / "model"

    def train_vae(self, images: RenderedImages) -> None:
        """Phase 1: the autoencoder on random crops of ``images`` ([3, 64, 64] each, in [-1, 1])."""
        cfg, vae = self.cfg, self.vae
        opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(min(50, max(1, cfg.vae_steps // 5)), cfg.vae_steps))
        vae.train()
        bar = tqdm(range(cfg.vae_steps), desc="autoencoder", disable=not self.progress, mininterval=5)
        running = None
        for step, (idx, corner) in zip(bar, vae_batches(cfg, cfg.vae_steps)):
            x = images[idx]
            if corner is not None:
                oy, ox = corner
                x = x[:, :, oy : oy + cfg.vae_crop, ox : ox + cfg.vae_crop]
            post = vae.encode(x).latent_dist
            z = post.mean  # decoded from the mean: the small KL term only keeps the latents tame
            rec = vae.decode(z).sample
            # pixels, plus their 4x4 means: colour (low frequency) is learnt early, not last
            rec_loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + F.mse_loss(F.avg_pool2d(rec, 4), F.avg_pool2d(x, 4))
            kl = post.kl().mean() / z[0].numel()
            loss = rec_loss + cfg.vae_kl_weight * kl * z[0].numel()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
            opt.step()
            sched.step()
            running = loss.item() if running is None else 0.98 * running + 0.02 * loss.item()
            if step % cfg.log_every == 0 or step == cfg.vae_steps - 1:
                bar.set_postfix(loss=f"{running:.4f}")
                self.log(phase="autoencoder", step=step, loss=float(loss.item()), rec=float(rec_loss.item()), kl=float(kl.item()))
        vae.eval().requires_grad_(False)

    @torch.no_grad()
    def encode_latents(self, images: RenderedImages) -> None:
        """Encode each image the UNet phase draws once; set the VAE scaling factor to 1/std of those latents."""
        used = torch.tensor(self.unet_used, dtype=torch.long)
        pixels = images[used] if len(used) else images.images[:0]
        means, stds = [], []
        for i in tqdm(range(0, pixels.shape[0], 256), desc="encode", disable=not self.progress, mininterval=5):
            post = self.vae.encode(pixels[i : i + 256]).latent_dist
            means.append(post.mean)
            stds.append(post.std)
        mean, std = torch.cat(means), torch.cat(stds)
        if len(used) == self.cfg.train_images:  # every image drawn (a full run): the tensors as they come
            self.lat_mean, self.lat_std = mean, std
        else:  # rows of undrawn images stay 0; the memory format is kept (it steers the UNet's conv kernels)
            channels_last = mean.dim() == 4 and mean.is_contiguous(memory_format=torch.channels_last)
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            self.lat_mean = mean.new_zeros((self.cfg.train_images, *mean.shape[1:])).to(memory_format=fmt)
            self.lat_std = std.new_zeros((self.cfg.train_images, *std.shape[1:])).to(memory_format=fmt)
            self.lat_mean[used.to(mean.device)], self.lat_std[used.to(std.device)] = mean, std
        scaling = float(1.0 / mean.std())
        self.vae.register_to_config(scaling_factor=scaling)
        rec = self.vae.decode(mean[:256]).sample
        err = float(F.mse_loss(rec, pixels[:256]))
        self.log(phase="latents", scaling_factor=scaling, recon_mse=err)
        logger.info("latents: scaling factor %.4f, reconstruction MSE %.5f", scaling, err)

    def train_unet(self) -> None:
        """Phase 2: text encoder and UNet jointly (epsilon MSE), with EMA, saves and checks."""
        from diffusers import DDPMScheduler

        cfg = self.cfg
        noise_sched = DDPMScheduler.from_config({k: v for k, v in SD_SCHEDULER_CONFIG.items() if k not in ("set_alpha_to_one",)})
        alphas = noise_sched.alphas_cumprod.float()
        weights = loss_weights(alphas, cfg.x0_weight_cap).to(self.device)
        alphas = alphas.to(self.device)
        dev = self.device
        self.unet.train()
        self.text_encoder.train()
        opt = torch.optim.AdamW([
            {"params": self.unet.parameters(), "lr": cfg.lr},
            {"params": self.text_encoder.parameters(), "lr": cfg.text_lr},
        ], weight_decay=0.01)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg.warmup, cfg.unet_steps))
        ema = _Ema([self.unet, self.text_encoder], cfg.ema_decay)
        scale = self.vae.config.scaling_factor
        bar = tqdm(range(cfg.unet_steps), desc="unet+text", disable=not self.progress, mininterval=5)
        running = None
        for step, (idx, drop, t, eps) in zip(bar, unet_batches(cfg, unet_step_count(cfg), self.latent_shape)):
            idx = idx.to(dev)
            z0 = self.lat_mean[idx] * scale
            ids = self.ids[idx].clone()
            ids[drop.to(dev)] = self.empty_ids
            t = t.to(dev)
            eps = eps.to(dev)
            a = alphas[t].view(-1, 1, 1, 1)
            zt = a.sqrt() * z0 + (1 - a).sqrt() * eps
            states = self.text_encoder(ids)[0]
            pred = self.unet(zt, t, encoder_hidden_states=states).sample
            if cfg.x0_weight_cap:
                loss = (weights[t] * (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))).mean()
            else:
                loss = F.mse_loss(pred, eps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0)
            opt.step()
            sched.step()
            ema.update(step)
            running = loss.item() if running is None else 0.99 * running + 0.01 * loss.item()
            if step % cfg.log_every == 0 or step == cfg.unet_steps - 1:
                bar.set_postfix(loss=f"{running:.4f}")
                self.log(phase="unet", step=step, loss=float(loss.item()), loss_avg=float(running))
            out_of_time = cfg.max_minutes > 0 and time.perf_counter() - self.t0 > 60.0 * cfg.max_minutes
            if out_of_time:
                logger.warning("stopping at UNet step %d of %d: the run reached --max-minutes %.1f", step + 1, cfg.unet_steps, cfg.max_minutes)
                self.log(phase="time_limit", step=step + 1, max_minutes=cfg.max_minutes)
            last = step == cfg.unet_steps - 1 or (cfg.stop_at > 0 and step + 1 == cfg.stop_at) or out_of_time
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or (cfg.save_every and (step + 1) % cfg.save_every == 0) or last:
                ema.swap()
                self.unet.eval()
                self.text_encoder.eval()
                if last or (cfg.save_every and (step + 1) % cfg.save_every == 0):
                    self.save(self.out / "model")
                if cfg.eval_every and ((step + 1) % cfg.eval_every == 0 or last):
                    figures = self.evaluate()
                    self.log(phase="eval", step=step + 1, **figures)
                    logger.info("step %d: %s", step + 1, figures)
                ema.swap()
                self.unet.train()
                self.text_encoder.train()
            if last:
                break

    # ----------------------------------------------------------------- outputs
    @torch.no_grad()
    def evaluate(self) -> Dict[str, float]:
        """Scorer figures on held-out prompts (always-CFG 7.5, DDIM ``eval_steps``)."""
        from .scorer import accuracy

        cfg = self.cfg
        pairs = sample_captioned(cfg.eval_seed, cfg.eval_prompts)
        images = generate_images(self.text_encoder, self.unet, self.vae, [p[1] for p in pairs], steps=cfg.eval_steps, seed=cfg.eval_seed)
        return accuracy(list(images), [p[0] for p in pairs])

    def save(self, path: Path) -> Path:
        """Write the diffusers folder (atomically replaced)."""
        save_pipeline(self.vae, self.text_encoder, self.unet, path, fp16=self.cfg.fp16)
        self.log(phase="save", path=str(path.name))
        return path


def save_pipeline(vae, text_encoder, unet, path: Path, fp16: bool = True) -> Path:
    """Save the three modules with CLIP's tokenizer and a DDIM scheduler as a diffusers folder."""
    import copy

    from diffusers import DDIMScheduler, StableDiffusionPipeline

    mods = [copy.deepcopy(m).eval().cpu() for m in (vae, text_encoder, unet)]
    if fp16:
        mods = [m.half() for m in mods]
    pipe = StableDiffusionPipeline(
        vae=mods[0], text_encoder=mods[1], unet=mods[2], tokenizer=load_clip_tokenizer(),
        scheduler=DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False,
    )
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    pipe.save_pretrained(tmp, safe_serialization=True)
    from .portable import make_portable  # text_model.* keys, vocab.json and merges.txt: transformers 4.x reads it too

    make_portable(tmp)
    if path.exists():
        shutil.rmtree(path)
    tmp.rename(path)
    return path


@torch.no_grad()
def generate_images(text_encoder, unet, vae, prompts: Sequence[str], steps: int = 20, guidance: float = 7.5, seed: int = 0) -> np.ndarray:
    """``[N, 64, 64, 3]`` float images in [0, 1] by plain CFG DDIM (the recipe's own check)."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    sched.set_timesteps(steps)
    device = next(unet.parameters()).device
    cond = text_encoder(tokenize(prompts).to(device))[0]
    uncond = text_encoder(tokenize([""] * len(prompts)).to(device))[0]
    states = torch.cat([uncond, cond])
    side = unet.config.sample_size
    gen = torch.Generator().manual_seed(seed)
    lat = torch.randn((len(prompts), 4, side, side), generator=gen).to(device)
    for t in sched.timesteps:
        u, c = unet(torch.cat([lat, lat]), t, encoder_hidden_states=states).sample.chunk(2)
        lat = sched.step(u + guidance * (c - u), t, lat).prev_sample
    img = vae.decode(lat / vae.config.scaling_factor).sample
    return (img / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
