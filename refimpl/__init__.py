"""refimpl: a pure-NumPy reference implementation of residual-stream subvalue analysis.

Yu & Ananiadou, "Locating Factual Knowledge in Large Language Models: Exploring the
Residual Stream and Analyzing Subvalues in Vocabulary Space".

    r = refimpl.locate("The capital of France is")           # the main job, embedded model
    model = refimpl.load("capitals-gpt2")                    # refimpl.models() lists names
    trace = refimpl.run(model, "The capital of France is")
    trace.Lres(2), trace.attn_subvalues(2, t=-1), trace.readout().bs(v)
"""
__version__ = "0.1.0"

from .errors import FormatError, RefimplError
from .forward import forward, run
from .model import Model
from .readout import Readout, rank_of, top_ids
from .trace import LayerTrace, Trace
# The submodule refimpl.locate is imported before the function of the same name is bound
# here: importing a submodule the first time sets it as the package's attribute, which
# would otherwise replace the function `refimpl.locate` later.
from . import locate as _locate_module  # noqa: F401,E402
from .api import LocateResult, load, locate, models  # noqa: E402

__all__ = ["load", "locate", "models", "run", "forward", "Model", "Trace", "LayerTrace", "Readout",
           "LocateResult", "rank_of", "top_ids", "RefimplError", "FormatError", "__version__"]
