"""The hierarchical conditional flow of seed 001 as a LightningModule.

Logged (``train/``, ``val/``, ``test/``):

* ``loss``: eq. 12 with Table 4's weights, sum_i w_i (-log p(y_i | y_>i)) in bits. It
  is what the model minimizes, not a likelihood.
* ``elbo_bpd_R``: the honest number, the unweighted single-sample ELBO of the images
  in bits per dim, entropy of q included (sec. 2.2): an upper bound on the negative
  log-likelihood (the model contract marks it a bound; seed 001 Table 1 reports it
  as "<="). In evaluation q uses the running sigma(X) and one draw of y (see
  ``flows/hierarchical.py``), and the images carry only the uniform dequantization
  noise, so it bounds the discrete data's bits per dim.
* ``level_bpd_<R>`` / ``level_bpd_prior``: -log p(y_i | y_>i) per dimension of y_i, in
  bits (the terms of eq. 12, unweighted); ``entropy_bpd``: the entropy of q per image
  dimension; ``sigma_<R>``: sigma(X) of eq. 11 per level.
"""
from __future__ import annotations



from flows.dequantization import UniformDequantizer
from flows.hierarchical import HierarchicalFlow
from lightning_modules.base import FlowModule
from lightning_modules.errors import ConfigurationError
from lightning_modules.parts import Freeze, OptimizerSettings, Part



class HierarchicalModule(FlowModule):
    """Seed 001's model with its three parameter groups (Table 2).

    Args:
        flow: the :class:`~flows.hierarchical.HierarchicalFlow` (``class_path`` with its
            levels; Config A in ``experiments/hierarchical_celebahq256.yaml``).
        encoder_optimizer, decoder_optimizer, flow_optimizer: the groups' settings (the
            official code's grouping: encoders, decoders, and the flows).
        freeze_encoders_at_epoch: the encoders stop training from this epoch (Table 2: 60);
            None: never.
        train_noise_std: std of the Gaussian noise added to the dequantized training
            images (App. G: 5e-3, on [0, 1] images: the same number on our [-0.5, 0.5]).
            Evaluation leaves it out so ``elbo_bpd`` bounds the discrete data.
    The remaining args are :class:`FlowModule`'s (Table 2: gradient clipping 50;
    ``accumulate_grad_batches``: the official code's micro-batches, 4 x 4 = 16 on one GPU).
    """

    # FID reference when ``fid.reference_split`` is not set: the training images, as the
    # official code (``run_metrics``: the training set, up to FID_N_SAMPLES = 30k).
    fid_reference_split = "train"

    bound_metric = "elbo_bpd"

    def __init__(self, *, flow: HierarchicalFlow, encoder_optimizer: OptimizerSettings | None = None,
                 decoder_optimizer: OptimizerSettings | None = None,
                 flow_optimizer: OptimizerSettings | None = None,
                 freeze_encoders_at_epoch: int | None = 60, train_noise_std: float = 5e-3,
                 grad_clip_norm: float | None = 50.0, **training) -> None:
        super().__init__(grad_clip_norm=grad_clip_norm, **training)
        self.save_config()
        if train_noise_std < 0:
            raise ConfigurationError(f"train_noise_std must be >= 0, got {train_noise_std}")
        if freeze_encoders_at_epoch is not None and freeze_encoders_at_epoch < 0:
            raise ConfigurationError(f"freeze_encoders_at_epoch must be >= 0 or null, got {freeze_encoders_at_epoch}")
        self.model = flow
        # Seed 001 Table 2: Adam, 5e-4 x0.92 per epoch for the encoders, 2e-3 and 5e-3 x0.95
        # for the decoders and the flows.
        self.settings = {"encoders": encoder_optimizer or OptimizerSettings.adam(5e-4, epoch_decay=0.92),
                         "decoders": decoder_optimizer or OptimizerSettings.adam(2e-3, epoch_decay=0.95),
                         "flows": flow_optimizer or OptimizerSettings.adam(5e-3, epoch_decay=0.95)}
        self.freeze_encoders_at_epoch = freeze_encoders_at_epoch
        if not isinstance(flow.dequantizer, UniformDequantizer):
            raise ConfigurationError("HierarchicalModule trains with uniform dequantization plus train_noise_std "
                                     f"(App. G); the model has a {type(flow.dequantizer).__name__}")
        # App. G's training noise is part of the model's dequantization, so the model's
        # own objective (HierarchicalFlow.training_loss) sees it.
        flow.dequantizer = UniformDequantizer(training_noise_std=train_noise_std)
        self.train_noise_std = train_noise_std
        self.load_parts()

    def parts(self) -> list[Part]:
        encoders = self.model.encoders
        return [Part("encoders", encoders, self.settings["encoders"], ["model.encoders."],
                     freezes=[Freeze(encoders, from_epoch=self.freeze_encoders_at_epoch)]),
                Part("decoders", self.model.decoders, self.settings["decoders"], ["model.decoders."]),
                Part("flows", self.model.flows, self.settings["flows"], ["model.flows."])]

    def check_temperature(self, temperature) -> None:
        self.model.temperatures(temperature)
