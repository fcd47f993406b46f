"""moe_compile: a compiler for Mixture-of-Experts models.

    import moe_compile as mc
    print(mc.inspect(model))                       # every MoE block, what it computes
    model = mc.optimize(model, profile="balanced") # in place; model.moe_compile says what was applied
"""

__version__ = "0.1.0"

from moe_compile import kernels  # noqa: F401,E402  (registers torch.ops.moe_compile.fused_moe)
from moe_compile.api import inspect, optimize  # noqa: E402
from moe_compile.backend import register_compile_backend  # noqa: E402
from moe_compile.errors import (  # noqa: E402
    FeatureUnavailableError, MissingDependencyError, MoECompileError, ModelLoadError, ProfileError)
from moe_compile.profiles import builtin_profiles, load_profile  # noqa: E402
from moe_compile.spec import MoESpec  # noqa: E402

register_compile_backend()

__all__ = ["FeatureUnavailableError", "MissingDependencyError", "MoECompileError", "MoESpec", "ModelLoadError",
           "ProfileError", "__version__", "builtin_profiles", "inspect", "load_profile", "optimize"]

from moe_compile.checkpoint import export, load  # noqa: E402
from moe_compile.errors import CheckpointError  # noqa: E402

__all__ += ["CheckpointError", "export", "load"]
