"""refimpl: a pure-NumPy reference implementation of residual-stream subvalue analysis.

Yu & Ananiadou, "Locating Factual Knowledge in Large Language Models: Exploring the
Residual Stream and Analyzing Subvalues in Vocabulary Space".

    model = refimpl.load("converted/stories260K", dtype="float64")
    trace = refimpl.run(model, "Once upon a time")
    trace.Lres(2), trace.attn_subvalues(2, t=-1), trace.readout().bs(v)
"""
from .errors import FormatError, RefimplError
from .forward import forward, run
from .model import Model, load
from .readout import Readout, rank_of, top_ids
from .trace import LayerTrace, Trace

__version__ = "0.1.0"
__all__ = ["load", "run", "forward", "Model", "Trace", "LayerTrace", "Readout", "rank_of", "top_ids",
           "RefimplError", "FormatError", "__version__"]
