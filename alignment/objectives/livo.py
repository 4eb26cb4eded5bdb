"""LiVO: value-aligned diffusion through a trained value encoder (docs/methods.md#livo).

The UNet, the VAE and the backbone's text encoder ``E`` stay frozen. A **value encoder** ``E_φ`` — a full copy of
``E``, initialised from it — reads ``value + ", " + prompt``; its pooled output becomes **one extra token** in front
of the frozen prompt embedding (docs/methods.md#value-encoder-and-value-token):

    c_v = concat([E_φ(v + ", " + x).pooled[:, None, :], E(x)], dim=1)      1 + 77 tokens
    c   = E(x)                                                            without a value: the base conditioning

The loss compares the UNet's denoising error under ``c_v`` (gradient to φ) with its error under ``c`` (no gradient),
on the same noisy latents — one t and one ε shared by the preferred image w and the dispreferred image l
(docs/methods.md#livo-loss):

    L_θ(y) = L(unet; z0(y), c_v, t, ε)           L_r(y) = L(unet; z0(y), E(x), t, ε)

    livo       max(0, γ1 + β(L_θ(w) − L_r(w))) + max(0, γ2 + α(L_r(l) − L_θ(l)))          [Eq 6]
    dpo        −log σ(β log(L_r(w)/L_θ(w)) − β log(L_r(l)/L_θ(l)))                        [Eq 13]
    dpo_d      −log σ(β log(L_r(w)/L_θ(w)) − α log(L_r(l)/L_θ(l)))                        [Eq 14]
    no_margin  β(L_θ(w) − L_r(w)) + α(L_r(l) − L_θ(l))                                    [Eq 20]
    dapt       L_θ(w)                                                   (SFT of the value encoder on w)

each a batch mean. The ablations that train something else or nothing are expressed through the contract
(docs/methods.md#livo-ablations): ``unfreeze_unet`` is ``method.finetune=full`` (the UNet's parameters join the
optimizer beside φ); ``untrained_encoder`` (``encoder: initial``) and ``no_value_encoder`` (``encoder: in_prompt``)
train nothing, so ``alignment.run`` refuses them and ``python -m alignment.export_untrained`` writes their run folder
(a ``conditioner/`` without weights) for ``alignment.generate`` / ``alignment.evaluate``.

SDXL is refused: its conditioning concatenates the *penultimate* hidden states of two encoders (768 + 1280 wide) and
adds encoder 2's projected pooled output as ``text_embeds``; a value token would need a 2048-wide vector that no
single pooled output gives (the paper and the authors' code are SD 1.5 only), so there is no faithful reading.
"""

from __future__ import annotations

import copy
import math
import os
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from alignment.conditioning import WEIGHTS_NAME, Conditioner
from alignment.errors import ConfigError
from alignment.objectives.base import Objective, ObjectiveOutput, PairBatch, per_sample_mse, shared_pass

# docs/methods.md#value-principles: the authors' strings; bias values first, then toxicity values
BIAS_VALUES: tuple[str, ...] = ("gender equality", "racial equality")
TOXICITY_VALUES: tuple[str, ...] = ("nudity considered inappropriate", "bloody considered inappropriate",
                                    "zombie considered inappropriate")
VALUES: tuple[str, ...] = BIAS_VALUES + TOXICITY_VALUES
LOSSES: tuple[str, ...] = ("livo", "dpo", "dpo_d", "no_margin", "dapt")
ENCODERS: tuple[str, ...] = ("trained", "initial", "in_prompt")
NEGATIVE_PADS: tuple[str, ...] = ("repeat_last", "zeros")
VALUE_ENCODER_DIR = "value_encoder"   # <run>/conditioner/value_encoder/: CLIPTextModel.from_pretrained reads it
SEPARATOR = ", "                      # the encoder reads value + ", " + prompt


def check_values(values, key: str = "method.values") -> list[str]:
    """The configured value set: a non-empty list of distinct, non-empty strings."""
    if isinstance(values, str) or not isinstance(values, Sequence) or not values:
        raise ConfigError(f"{key} must be a non-empty list of value strings, got {values!r}")
    checked = []
    for value in values:
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{key} must hold non-empty strings, got {value!r}")
        if value in checked:
            raise ConfigError(f"{key}: value {value!r} is listed twice")
        checked.append(value)
    return checked


def row_values(extras: dict[str, Any], count: int, allowed: Sequence[str]) -> list[str | None]:
    """The ``value`` extra of each of ``count`` prompts (None: no value); a value outside ``allowed`` is an error."""
    values = extras.get("value")
    if values is None:
        return [None] * count
    values = list(values)
    if len(values) != count:
        raise ValueError(f"{len(values)} values for {count} prompts")
    for value in values:
        if value is not None and value not in allowed:
            raise ConfigError(f"value {value!r} is not in the configured value set ({', '.join(allowed)})")
    return [v if v is None else str(v) for v in values]


def refuse_sdxl(backbone_target: str | None = None, backbone=None) -> None:
    """One-line refusal of SDXL (see the module docstring), from the config's ``_target_`` before any model loads,
    or from the built backbone."""
    if (backbone_target and "sdxl" in str(backbone_target).lower()) or hasattr(backbone, "text_encoder_2"):
        raise ConfigError("backbone: LiVO supports SD 1.x / 2.x only — SDXL's two-encoder conditioning (768+1280 "
                          "penultimate states plus text_embeds) has no single pooled value token "
                          "(docs/methods.md#value-encoder-and-value-token)")


# ------------------------------------------------------------------------------------------------ conditioners
class ValueEncoder(Conditioner):
    """``E_φ``: prepends the pooled output of a copy of the text encoder on ``value + ", " + prompt`` as one token
    (docs/methods.md#value-encoder-and-value-token).

    ``trained=False`` is the untrained-encoder ablation: the backbone's own text encoder is used as it is (no copy,
    no weights in the export). ``negative_pad`` fills the extra position where a prompt has no value token but its
    batch needs 1 + 77 tokens: the CFG branch (docs/methods.md#cfg-and-mixed-batches) and value-free prompts that
    share a batch with valued ones — ``repeat_last`` repeats the embedding's last (padding) token, ``zeros`` adds a
    zero vector. A batch in which no prompt has a value gets exactly the backbone's conditioning.
    """

    extras = ("value",)

    def __init__(self, values: Sequence[str] = VALUES, negative_pad: str = "repeat_last", trained: bool = True,
                 gradient_checkpointing: bool = False):
        values = check_values(list(values))
        if negative_pad not in NEGATIVE_PADS:
            raise ConfigError(f"method.negative_pad must be one of {', '.join(NEGATIVE_PADS)}, got {negative_pad!r}")
        # the export records what rebuilds it for inference (checkpointing is a training setting: not recorded)
        super().__init__(values=values, negative_pad=negative_pad, trained=bool(trained))
        self.values = values
        self.negative_pad = negative_pad
        self.trained = bool(trained)
        self.gradient_checkpointing = bool(gradient_checkpointing)

    def setup(self, backbone) -> None:
        if getattr(self, "_encoder", None) is not None:
            return
        refuse_sdxl(backbone=backbone)
        encoder = backbone.text_encoder
        width = int(encoder.config.hidden_size)
        cross = getattr(getattr(backbone.unet, "config", None), "cross_attention_dim", width)
        if width != cross:  # SD 1.5: 768 = 768; SD 2.1 (OpenCLIP-H): 1024 = 1024
            raise ConfigError(f"backbone: the text encoder's pooled output is {width} wide but the UNet attends to "
                              f"{cross}-wide tokens; the value token needs them equal")
        if self.trained:
            encoder = copy.deepcopy(encoder).float().requires_grad_(True)   # E_φ, initialised from E
            if self.gradient_checkpointing:
                enable = getattr(encoder, "activation_checkpointing_enable", None) \
                    or encoder.gradient_checkpointing_enable
                enable()
            for name, child in encoder.named_children():   # registered here: state keys = CLIPTextModel's own
                self.add_module(name, child)
        object.__setattr__(self, "_encoder", encoder)   # the CLIPTextModel wrapper, outside the module registry

    def value_tokens(self, backbone, texts: list[str]) -> torch.Tensor:
        """``E_φ(text).pooled``: (N, D), one vector per ``value + ", " + prompt`` string."""
        tokens = backbone.tokenizer(texts, padding="max_length", max_length=backbone.tokenizer.model_max_length,
                                    truncation=True, return_tensors="pt")
        input_ids = tokens.input_ids.to(next(self._encoder.parameters()).device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trained):
            return self._encoder(input_ids).pooler_output

    def pad_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, 1, D): what stands in the extra position for a row without a value token."""
        return hidden[:, -1:, :] if self.negative_pad == "repeat_last" else torch.zeros_like(hidden[:, :1, :])

    def forward(self, backbone, prompts, extras, prompt_cond):
        values = row_values(extras, len(prompts), self.values)
        if all(v is None for v in values):
            return prompt_cond                          # no value: exactly the base conditioning
        hidden = prompt_cond["encoder_hidden_states"]
        rows = [i for i, v in enumerate(values) if v is not None]
        pooled = self.value_tokens(backbone, [values[i] + SEPARATOR + prompts[i] for i in rows])
        dtype = torch.promote_types(pooled.dtype, hidden.dtype)
        pad = self.pad_token(hidden).to(dtype)
        where = {row: j for j, row in enumerate(rows)}
        first = torch.stack([pooled[where[i]].to(dtype)[None] if i in where else pad[i] for i in range(len(values))])
        return {**prompt_cond, "encoder_hidden_states": torch.cat([first, hidden.to(dtype)], dim=1)}

    def negative(self, backbone, negative_cond, extras):
        """CFG's other branch: the plain empty-prompt embedding, padded to 1 + 77 tokens when the batch has values
        (no value token: docs/methods.md#cfg-and-mixed-batches)."""
        values = row_values(extras, negative_cond["encoder_hidden_states"].shape[0], self.values)
        if all(v is None for v in values):
            return negative_cond
        hidden = negative_cond["encoder_hidden_states"]
        return {**negative_cond, "encoder_hidden_states": torch.cat([self.pad_token(hidden), hidden], dim=1)}

    def save_pretrained(self, folder, state_dict=None) -> Path:
        """``conditioner.json`` (with the value set) + ``conditioner.safetensors``, and for a trained encoder
        ``value_encoder/`` (config.json + model.safetensors, a hard link to the same tensors), which
        ``transformers.CLIPTextModel.from_pretrained`` reloads on its own (the tokenizer is the backbone's)."""
        folder = super().save_pretrained(folder, state_dict)
        hf_dir = Path(folder) / VALUE_ENCODER_DIR
        if not self.trained:
            return folder
        hf_dir.mkdir(parents=True, exist_ok=True)
        self._encoder.config.save_pretrained(str(hf_dir))
        target = hf_dir / "model.safetensors"
        target.unlink(missing_ok=True)
        try:
            os.link(Path(folder) / WEIGHTS_NAME, target)
        except OSError:  # a file system without hard links
            import shutil

            shutil.copyfile(Path(folder) / WEIGHTS_NAME, target)
        return folder


class ValueInPrompt(Conditioner):
    """The no-value-encoder ablation (LiVO w/o v): the value is written into the prompt, ``value + ", " + prompt``,
    and encoded by the backbone's own frozen text encoder (77 tokens); prompts without a value keep their own
    embedding. Nothing is trained and nothing is stored."""

    extras = ("value",)

    def __init__(self, values: Sequence[str] = VALUES):
        values = check_values(list(values))
        super().__init__(values=values)
        self.values = values

    def setup(self, backbone) -> None:
        refuse_sdxl(backbone=backbone)

    def forward(self, backbone, prompts, extras, prompt_cond):
        values = row_values(extras, len(prompts), self.values)
        rows = [i for i, v in enumerate(values) if v is not None]
        if not rows:
            return prompt_cond
        written = backbone.encode_prompt([values[i] + SEPARATOR + prompts[i] for i in rows])["encoder_hidden_states"]
        hidden = prompt_cond["encoder_hidden_states"]
        where = {row: j for j, row in enumerate(rows)}
        rebuilt = torch.stack([written[where[i]].to(hidden.dtype) if i in where else hidden[i]
                               for i in range(len(values))])
        return {**prompt_cond, "encoder_hidden_states": rebuilt}


def make_conditioner(encoder: str, values: Sequence[str], negative_pad: str = "repeat_last",
                     gradient_checkpointing: bool = False) -> Conditioner:
    """The conditioner of ``method.encoder``: ``trained`` / ``initial`` (a ValueEncoder) or ``in_prompt``."""
    if encoder not in ENCODERS:
        raise ConfigError(f"method.encoder must be one of {', '.join(ENCODERS)}, got {encoder!r}")
    if encoder == "in_prompt":
        return ValueInPrompt(values)
    return ValueEncoder(values, negative_pad=negative_pad, trained=encoder == "trained",
                        gradient_checkpointing=gradient_checkpointing)


# ------------------------------------------------------------------------------------------------ loss forms
def livo_loss(policy_w: torch.Tensor, policy_l: torch.Tensor | None, ref_w: torch.Tensor | None,
              ref_l: torch.Tensor | None, form: str, beta: float, alpha: float, gamma1: float,
              gamma2: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-sample loss of one form (docs/methods.md#livo-loss and #livo-ablations) and its per-sample terms."""
    if form == "dapt":
        return policy_w, {}
    if form == "livo":                                                                  # [Eq 6]
        term_w = torch.relu(gamma1 + beta * (policy_w - ref_w))
        term_l = torch.relu(gamma2 + alpha * (ref_l - policy_l))
        return term_w + term_l, {"loss_w": term_w, "loss_l": term_l}
    if form == "no_margin":                                                             # [Eq 20]
        term_w, term_l = beta * (policy_w - ref_w), alpha * (ref_l - policy_l)
        return term_w + term_l, {"loss_w": term_w, "loss_l": term_l}
    if form in ("dpo", "dpo_d"):                                                        # [Eq 13], [Eq 14]
        beta_l = beta if form == "dpo" else alpha
        inside = beta * torch.log(ref_w / policy_w) - beta_l * torch.log(ref_l / policy_l)
        return -F.logsigmoid(inside), {"inside": inside}
    raise ConfigError(f"method.loss must be one of {', '.join(LOSSES)}, got {form!r}")


# ------------------------------------------------------------------------------------------------ the objective
class LiVO(Objective):
    """The LiVO loss and its ablations as one component (``method=livo``, ``livo_dpo``, ...). The policy is the
    frozen UNet under the value-conditioned ``batch.cond``; the "reference" is the same UNet under the plain
    ``batch.prompt_cond`` without gradient, so no reference strategy is needed."""

    needs_reference = False

    def __init__(self, loss: str = "livo", beta: float = 1000.0, alpha: float = 500.0, gamma1: float = 1.0,
                 gamma2: float = 0.5, values: Sequence[str] = VALUES, encoder: str = "trained",
                 negative_pad: str = "repeat_last", share_noise: bool = True, gradient_checkpointing: bool = False,
                 backbone: str | None = None, export_only: bool = False):
        super().__init__()
        if loss not in LOSSES:
            raise ConfigError(f"method.loss must be one of {', '.join(LOSSES)}, got {loss!r}")
        for key, value in (("beta", beta), ("alpha", alpha)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ConfigError(f"method.{key} must be > 0, got {value!r}")
        for key, value in (("gamma1", gamma1), ("gamma2", gamma2)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ConfigError(f"method.{key} must be a number, got {value!r}")
        refuse_sdxl(backbone_target=backbone)
        if encoder in ("initial", "in_prompt") and not export_only:
            raise ConfigError(f"method.encoder={encoder}: this ablation trains nothing, so alignment.run has "
                              f"nothing to do — write its run folder with `python -m alignment.export_untrained "
                              f"method=<this method> backbone=...` and evaluate that folder")
        self.loss_form = loss
        self.trains_nothing = encoder != "trained"   # read by alignment.export_untrained
        self.beta, self.alpha = float(beta), float(alpha)
        self.gamma1, self.gamma2 = float(gamma1), float(gamma2)
        self.share_noise = bool(share_noise)
        self.conditioner = make_conditioner(encoder, values, negative_pad, gradient_checkpointing)

    def forward(self, backbone, batch: PairBatch, seed: int) -> ObjectiveOutput:
        from alignment.objectives.dpo import pair_inputs, pair_predictions

        b = batch.batch_size
        inputs = pair_inputs(backbone, batch, seed, self.share_noise)        # one t, ε for w and l
        if self.loss_form == "dapt":  # only the winner is needed
            noisy = inputs.noisy[:b].to(backbone.unet.dtype)
            prediction = backbone.unet_forward(noisy, inputs.timesteps[:b], batch.cond)
            policy_w = per_sample_mse(prediction, inputs.target[:b])
            return ObjectiveOutput(policy_w.mean(), {"policy_err_w": policy_w.mean().detach()})
        policy = per_sample_mse(pair_predictions(backbone, batch, seed, self.share_noise, "policy"), inputs.target)
        plain = per_sample_mse(self._plain_prediction(backbone, batch, seed, inputs), inputs.target)
        policy_w, policy_l = policy.chunk(2)
        ref_w, ref_l = plain.chunk(2)
        losses, terms = livo_loss(policy_w, policy_l, ref_w, ref_l, self.loss_form, self.beta, self.alpha,
                                  self.gamma1, self.gamma2)
        gain_w, gain_l = ref_w - policy_w, policy_l - ref_l   # > 0: the value token helps w / hurts l
        logs = {"policy_err_w": policy_w.mean(), "policy_err_l": policy_l.mean(),
                "ref_err_w": ref_w.mean(), "ref_err_l": ref_l.mean(),
                "margin_w": gain_w.mean(), "margin_l": gain_l.mean(),
                "implicit_acc": (gain_w + gain_l > 0).float().mean(),
                **{name: value.mean() for name, value in terms.items()}}
        if self.loss_form == "livo":
            logs["hinge_active_w"] = (terms["loss_w"] > 0).float().mean()
            logs["hinge_active_l"] = (terms["loss_l"] > 0).float().mean()
        return ObjectiveOutput(losses.mean(), {k: v.detach() for k, v in logs.items()})

    def _plain_prediction(self, backbone, batch: PairBatch, seed: int, inputs) -> torch.Tensor:
        """The UNet's prediction under the plain prompt conditioning ``E(x)`` on the same noisy inputs, no grad."""
        def compute():
            plain = {k: torch.cat([v, v]) for k, v in batch.prompt_cond.items()}
            with torch.no_grad():
                return backbone.unet_forward(inputs.noisy.to(backbone.unet.dtype), inputs.timesteps, plain)

        return shared_pass(batch, ("pair_prediction_plain", seed, self.share_noise), compute)
