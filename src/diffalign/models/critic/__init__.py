"""IQL critic (Kostrikov, Nair & Levine 2021, "Offline RL with Implicit Q-Learning").

Twin Q networks ``Q_1, Q_2(s, a)``, a state value ``V(s)`` fitted by expectile regression
onto the target twins' minimum, and Polyak-averaged target copies of the Q networks::

    L_V = E[ |τ − 1(u < 0)| · u² ],           u = min_i Q̄_i(s, a) − V(s)     (Q̄ detached)
    L_Q = Σ_i E[ (Q_i(s, a) − y)² ],           y = r + γ (1 − d) V(s')        (y detached)
    Q̄ ← (1 − τ_t) Q̄ + τ_t Q                                                   (after each step)

The two losses are gradient-isolated: ``L_V`` reaches only V's parameters, ``L_Q`` only the
online Q networks'; the targets never receive gradient. The critic takes and returns RAW
environment-space observations and actions: its normaliser statistics are buffers, so they
travel in ``model.safetensors`` with the weights (keys ``normalizer.<field>.<param>``, the
layout of :meth:`~diffalign.data.normalizer.NormalizerSet.to_tensors`).

:func:`expectile_loss`, :func:`iql_value_loss`, :func:`iql_q_loss` and :func:`awr_weights` are
the pure formulas; :class:`IQLCritic` wraps them; :func:`train_critic` runs the generic trainer.

The package splits the critic by job: :mod:`.config` (:class:`CriticConfig` and its
validation), :mod:`.networks` (the losses, the building blocks, :class:`IQLCritic` and
:class:`CriticEnsemble`), :mod:`.training` (transitions, batches, :func:`train_critic`) and
:mod:`.loading` (:func:`build_from_files`, :func:`load_critic`); every name is re-exported here.
"""

from .config import CRITIC_KIND, ENSEMBLE_KIND, CriticConfig
from .loading import CRITIC_CLASSES, build_from_files, load_critic
from .networks import (
    CriticEnsemble,
    FieldNormalizer,
    FourierInput,
    IQLCritic,
    as_tensor,
    awr_weights,
    expectile_loss,
    featured_mlp,
    iql_q_loss,
    iql_value_loss,
    make_field_normalizers,
    mlp,
    module_device,
)
from .training import (
    DeviceData,
    evaluate_critic,
    resolve_timeouts_as_terminals,
    sample_batch,
    train_critic,
    trainer_config,
    transitions_from_episodes,
)

__all__ = [
    "CRITIC_CLASSES",
    "CRITIC_KIND",
    "ENSEMBLE_KIND",
    "CriticConfig",
    "CriticEnsemble",
    "DeviceData",
    "FieldNormalizer",
    "FourierInput",
    "IQLCritic",
    "as_tensor",
    "build_from_files",
    "make_field_normalizers",
    "module_device",
    "resolve_timeouts_as_terminals",
    "trainer_config",
    "awr_weights",
    "evaluate_critic",
    "expectile_loss",
    "featured_mlp",
    "iql_q_loss",
    "iql_value_loss",
    "load_critic",
    "mlp",
    "sample_batch",
    "train_critic",
    "transitions_from_episodes",
]
