"""SNADNet as a task of the shared trainer: both training stages [paper 004, Sec. II, III-A].

SNADNet trains in two stages, each one run of the shared :class:`~.trainer.Trainer` (AMP,
DDP, checkpoints, exact resume, validation, logs):

* **Stage I, ``parsing``**: the face parser (:class:`~facedeblur_ext.models.face_parsing.
  FaceParsingNet`) learns to parse *blurry* faces against labels made from the sharp faces by
  the data pipeline, with the focal loss (gamma 2) on its main and auxiliary heads; SGD, lr
  0.02, momentum 0.9, weight decay 5e-4. Validation reports mIoU, per-region IoU and pixel
  accuracy on the held-out faces.
* **Stage II, ``deblur``**: the parser is loaded from stage I's checkpoint and frozen inside
  :class:`~facedeblur_ext.models.snadnet.SNADNet`, where it computes the parsing map of the
  blurry input for the generator's SNAD layers. Each step updates the multi-patch
  discriminator (relativistic loss), then the generator with ``120 rec + 0.1 adv + texture``;
  Adam, lr 2e-4, betas (0.5, 0.999), for both. Validation reports PSNR/SSIM.

**Config.** One file describes both stages: its top level is shared, and the tables under
``stages.parsing`` / ``stages.deblur`` are merged over it for that stage (a key set there
wins, so override per-stage values as ``stages.deblur.train.epochs=50``). ``stage`` selects
what ``facedeblur train snadnet`` runs: ``both`` (stage I, then stage II from its result),
``parsing`` or ``deblur``. Stage ``<s>`` writes to ``<output_dir>/<s>/``; stage II takes its
parser from ``model.parser_checkpoint``, by default ``<output_dir>/parsing/checkpoints/last.pt``.
See :meth:`SNADNetTask.runs` and ``facedeblur_ext/configs/snadnet.yaml``.

**Data.** :class:`~facedeblur_ext.data.SNADNetDataset` samples (``blurry``, ``sharp``,
``regions`` [4, H, W] masks of the sharp face, ``parsing`` labels) from ``data.root``, a folder
of sharp faces, blurred by the pluggable ``data.blur`` synthesizer: see
:mod:`facedeblur_ext.training.face_data`.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..losses.snadnet import (
    ADV_HEAD_WEIGHTS,
    ADV_WEIGHT,
    REC_WEIGHT,
    REGION_NAMES,
    REGION_WEIGHTS,
    TEXTURE_WEIGHT,
    focal_loss,
    relativistic_adversarial_loss,
    snadnet_generator_loss,
)
from ..models.face_parsing import (
    colorize_regions,
    confusion_matrix,
    iou_from_confusion,
    parsing_labels,
)
from ..models.snadnet import build_discriminator, build_parser, build_snadnet
from ..nn.backend import resolve_backend
from .checkpoint import load_checkpoint
from .config import deep_merge
from .face_data import build_face_datasets
from .task import StepContext, Task

__all__ = ["LOSS_DEFAULTS", "STAGES", "SNADNetTask", "stage_config"]

#: the training stages, in order
STAGES = ("parsing", "deblur")

#: ``loss`` table defaults: the paper's (focal gamma 2, Eq. 2; weights of Eq. 11, 14, 15)
LOSS_DEFAULTS = {
    "focal_gamma": 2.0,
    # per-class alpha_t of the focal loss (None: 1 for every class)
    "focal_alpha": None,
    # weight of the parser's two auxiliary heads (face-parsing.PyTorch sums all three heads)
    "parser_aux_weight": 1.0,
    "rec_weight": REC_WEIGHT,
    "adv_weight": ADV_WEIGHT,
    "texture_weight": TEXTURE_WEIGHT,
    "region_weights": REGION_WEIGHTS,
    "head_weights": ADV_HEAD_WEIGHTS,
}

# Paper optimizer settings, used where the config leaves them out.
_SGD_DEFAULTS = {"lr": 0.02, "momentum": 0.9, "weight_decay": 5e-4}
_ADAM_DEFAULTS = {"lr": 2e-4, "betas": (0.5, 0.999), "weight_decay": 0.0}


def stage_config(config: dict, stage: str) -> dict:
    """The configuration of one stage's trainer run.

    The top level without ``stages``, merged with ``stages.<stage>``; ``stage`` set,
    ``output_dir`` made ``<output_dir>/<stage>``, and for stage II a missing
    ``model.parser_checkpoint`` pointed at stage I's last checkpoint.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown SNADNet stage {stage!r}; expected one of {STAGES}")
    stages = config.get("stages") or {}
    unknown = set(stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown tables under 'stages': {sorted(unknown)}; expected {STAGES}")
    base = {k: v for k, v in config.items() if k != "stages"}
    out = deep_merge(base, stages.get(stage) or {})
    root = Path(config.get("output_dir") or "runs/snadnet")
    out["stage"] = stage
    out["output_dir"] = str(root / stage)
    model = out.setdefault("model", {})
    if stage == "deblur" and not model.get("parser_checkpoint"):
        model["parser_checkpoint"] = str(root / "parsing" / "checkpoints" / "last.pt")
    return out


def _finished(run_config: dict) -> bool:
    """Whether the run's ``last.pt`` already reached its ``train.epochs`` / ``max_steps``
    (the trainer's own stopping rule)."""
    path = Path(run_config["output_dir"]) / "checkpoints" / "last.pt"
    if not path.exists():
        return False
    state = load_checkpoint(path)
    train = run_config.get("train") or {}
    max_steps = train.get("max_steps")
    return (int(state["epoch"]) >= int(train.get("epochs", 1))
            or (max_steps is not None and int(state["step"]) >= int(max_steps)))


class SNADNetTask(Task):
    """One stage of SNADNet (``config["stage"]``: ``parsing`` or ``deblur``); see the module
    docstring. ``facedeblur train snadnet`` runs the stages through :meth:`runs`."""

    name = "snadnet"

    def __init__(self, config: dict, device: torch.device):
        super().__init__(config, device)
        self.stage = config.get("stage")
        if self.stage not in STAGES:
            raise ValueError(
                f"a SNADNet trainer run needs stage 'parsing' or 'deblur', got {self.stage!r}; "
                "stage 'both' is two runs: see SNADNetTask.runs or `facedeblur train snadnet`")
        self.model_config = config.get("model") or {}
        loss = dict(config.get("loss") or {})
        unknown = set(loss) - set(LOSS_DEFAULTS)
        if unknown:
            raise ValueError(f"unknown SNADNet loss keys {sorted(unknown)}; "
                             f"known: {sorted(LOSS_DEFAULTS)}")
        self.loss = {**LOSS_DEFAULTS, **loss}
        self.ema_models = ("parser",) if self.stage == "parsing" else ("generator",)
        self.num_regions = int(self.model_config.get("num_regions", 4))
        self._confusion: Tensor | None = None

    # ------------------------------------------------------------------ runs

    @classmethod
    def runs(cls, config: dict, resume=None) -> list[tuple[dict, object]]:
        """The trainer runs of ``config["stage"]`` (``both``: stage I, then stage II).

        ``resume="auto"`` continues each stage from its own last checkpoint and skips a stage
        whose checkpoint already reached the stage's ``train.epochs`` or ``train.max_steps``;
        an explicit checkpoint resumes the stage it was written by, earlier stages count as
        done and later ones start afresh.
        """
        stage = config.get("stage", "both")
        if stage not in (*STAGES, "both"):
            raise ValueError(f"stage must be 'parsing', 'deblur' or 'both', got {stage!r}")
        names = list(STAGES) if stage == "both" else [stage]
        explicit = resume not in (None, "", False, "auto")
        if explicit:
            ckpt = load_checkpoint(resume)
            ckpt_stage = (ckpt.get("config") or {}).get("stage")
            if ckpt.get("task") != cls.name or ckpt_stage not in names:
                raise ValueError(f"{resume} is a checkpoint of task {ckpt.get('task')!r}, stage "
                                 f"{ckpt_stage!r}; this run trains SNADNet stage(s) {names}")
            names = names[names.index(ckpt_stage):]
        runs = []
        for name in names:
            run_config = stage_config(config, name)
            if explicit:
                run_resume = resume if name == names[0] else None
            else:
                run_resume = resume
                if resume == "auto" and _finished(run_config):
                    if os.environ.get("RANK", "0") == "0":
                        print(f"[resume] SNADNet stage {name} is complete in "
                              f"{run_config['output_dir']}: skipped")
                    continue
            runs.append((run_config, run_resume))
        return runs

    # ------------------------------------------------------------------ models

    def build_models(self) -> dict[str, nn.Module]:
        if self.stage == "parsing":
            return {"parser": build_parser(self.model_config)}
        backend = resolve_backend(self.model_config.get("backend"))
        parser = build_parser(self.model_config)
        parser.load_state_dict(self._stage1_parser_state())
        return {"generator": build_snadnet(self.model_config, parser, backend),
                "discriminator": build_discriminator(self.model_config)}

    def _stage1_parser_state(self) -> dict:
        path = self.model_config.get("parser_checkpoint")
        if not path or not Path(path).exists():
            raise FileNotFoundError(
                f"stage II needs the parser trained in stage I: model.parser_checkpoint={path!r} "
                "does not exist (run stage 'parsing' first, or set model.parser_checkpoint)")
        ckpt = load_checkpoint(path)
        if ckpt.get("task") != self.name or (ckpt.get("config") or {}).get("stage") != "parsing":
            raise ValueError(f"{path} is not a SNADNet stage-I (parsing) checkpoint")
        # The weights stage I validated with: its EMA when it kept one.
        ema = (ckpt.get("ema") or {}).get("parser")
        return ema if ema else ckpt["models"]["parser"]

    def build_optimizers(self, models: dict[str, nn.Module]) -> dict[str, torch.optim.Optimizer]:
        optim = self.config.get("optim") or {}

        def trainable(model: nn.Module) -> list[nn.Parameter]:
            return [p for p in model.parameters() if p.requires_grad]

        if self.stage == "parsing":
            args = {**_SGD_DEFAULTS, **{k: optim[k] for k in _SGD_DEFAULTS if k in optim}}
            return {"parser": torch.optim.SGD(
                trainable(models["parser"]), lr=float(args["lr"]),
                momentum=float(args["momentum"]), weight_decay=float(args["weight_decay"]))}
        args = {**_ADAM_DEFAULTS, **{k: optim[k] for k in _ADAM_DEFAULTS if k in optim}}
        return {name: torch.optim.Adam(trainable(models[name]), lr=float(args["lr"]),
                                       betas=tuple(float(b) for b in args["betas"]),
                                       weight_decay=float(args["weight_decay"]))
                for name in ("generator", "discriminator")}

    # ------------------------------------------------------------------ data

    def build_datasets(self):
        """:class:`~facedeblur_ext.data.SNADNetDataset` samples of ``data.root`` (see
        :func:`~.face_data.build_face_datasets`)."""
        return build_face_datasets(self.config)

    # ------------------------------------------------------------------ training

    def parsing_loss(self, logits: tuple[Tensor, Tensor, Tensor], labels: Tensor
                     ) -> tuple[Tensor, dict[str, Tensor]]:
        """Focal loss of the parser's main head plus its auxiliary heads (float32)."""
        gamma, alpha = float(self.loss["focal_gamma"]), self.loss["focal_alpha"]
        main_logits, aux8, aux16 = logits
        main = focal_loss(main_logits, labels, gamma, alpha)
        aux = focal_loss(aux8, labels, gamma, alpha) + focal_loss(aux16, labels, gamma, alpha)
        total = main + float(self.loss["parser_aux_weight"]) * aux
        return total, {"focal": main.detach(), "focal_aux": aux.detach(),
                       "parser_total": total.detach()}

    def training_step(self, models: dict[str, nn.Module], batch: dict,
                      ctx: StepContext) -> dict[str, float]:
        if self.stage == "parsing":
            return self._parsing_step(models, batch, ctx)
        return self._deblur_step(models, batch, ctx)

    def _parsing_step(self, models, batch, ctx) -> dict[str, float]:
        with ctx.autocast():
            logits = models["parser"](batch["blurry"], return_aux=True)
        loss, terms = self.parsing_loss(logits, parsing_labels(batch))
        logs = ctx.optimize("parser", loss)
        logs.update({k: float(v) for k, v in terms.items()})
        return logs

    def _deblur_step(self, models, batch, ctx) -> dict[str, float]:
        gen, disc = models["generator"], models["discriminator"]
        blurry, sharp = batch["blurry"], batch["sharp"]
        n = sharp.shape[0]
        head_weights = tuple(self.loss["head_weights"])
        # One generator forward serves both updates: the discriminator sees it detached, and
        # the generator's parameters do not change before its own backward.
        with ctx.autocast():
            fake, textures = gen(blurry, return_textures=True)

        # Discriminator: real and generated faces in one forward (one DDP forward/backward).
        with ctx.autocast():
            heads = disc(torch.cat([sharp, fake.detach()]))
        d_loss = relativistic_adversarial_loss([h[:n] for h in heads], [h[n:] for h in heads],
                                               head_weights)
        logs = ctx.optimize("discriminator", d_loss)

        # Generator, against the updated discriminator. The real half enters the relativistic
        # loss as a constant.
        with ctx.frozen("discriminator"), ctx.autocast():
            heads = disc(torch.cat([sharp, fake]))
        g_loss, terms = snadnet_generator_loss(
            fake.float(), sharp, batch["regions"], [t.float() for t in textures],
            [h[n:] for h in heads], [h[:n].detach() for h in heads],
            float(self.loss["rec_weight"]), float(self.loss["adv_weight"]),
            float(self.loss["texture_weight"]), tuple(self.loss["region_weights"]), head_weights)
        logs.update(ctx.optimize("generator", g_loss))
        logs["discriminator"] = float(d_loss.detach())
        logs["generator_total"] = float(g_loss.detach())
        logs.update({k: float(v) for k, v in terms.items()})
        return logs

    # ------------------------------------------------------------------ validation

    def validation_pairs(self, models, batch):
        if self.stage == "deblur":
            yield models["generator"].restore(batch["blurry"]), batch["sharp"]

    def validation_step(self, models, batch) -> None:
        if self.stage != "parsing":
            return
        pred = models["parser"](batch["blurry"]).argmax(dim=1)
        cm = confusion_matrix(pred, parsing_labels(batch), self.num_regions).cpu()
        self._confusion = cm if self._confusion is None else self._confusion + cm

    def validation_results(self) -> dict[str, float]:
        """Stage I: ``miou``, ``pixel_accuracy`` and ``iou_<region>`` over the validation set
        (from one confusion matrix, not an average of per-batch values)."""
        cm, self._confusion = self._confusion, None
        if cm is None:
            return {}
        miou, per_class = iou_from_confusion(cm)
        total = int(cm.sum())
        out = {"miou": miou, "pixel_accuracy": float(cm.diag().sum()) / total if total else
               float("nan")}
        names = REGION_NAMES if self.num_regions == len(REGION_NAMES) else [
            str(i) for i in range(self.num_regions)]
        out.update({f"iou_{name}": v for name, v in zip(names, per_class)})
        return out

    @torch.no_grad()
    def preview(self, models, dataset) -> Tensor | None:
        """Rows of [blurry, predicted parsing, label parsing, sharp] (stage I) or [blurry,
        parsing map used, restored, sharp] (stage II)."""
        count = int((self.config.get("val", {}).get("preview") or {}).get("images", 4))
        if count <= 0 or len(dataset) == 0:
            return None
        picks = sorted({round(i * (len(dataset) - 1) / max(1, count - 1)) for i in range(count)})
        samples = [dataset[i] for i in picks]
        batch = {k: torch.stack([s[k] for s in samples]).to(self.device)
                 for k in ("blurry", "sharp", "parsing")}
        blurry = batch["blurry"]
        if self.stage == "parsing":
            tiles = [blurry, colorize_regions(models["parser"](blurry)),
                     colorize_regions(parsing_labels(batch)), batch["sharp"]]
        else:
            restored, parsing = models["generator"].restore(blurry, return_parsing=True)
            tiles = [blurry, colorize_regions(parsing), restored, batch["sharp"]]
        pad = 2
        rows = torch.cat([F.pad(t.float().cpu(), (pad, pad, pad, pad), value=1.0)
                          for t in tiles], dim=3)  # [N, 3, h, 4 w]
        return torch.cat(list(rows), dim=1).clamp(0, 1)
