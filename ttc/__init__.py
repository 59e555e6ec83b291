"""ttc: test-time compute reasoning. Load a model, compose proposer / verifier / selector nodes, spend a budget."""

from ttc.api import Model, load
from ttc.budget import Budget, BudgetExceeded, Ledger
from ttc.graph import Branch, Meter, MissingCapability, Problem, Scored, Step
from ttc.result import Result
from ttc.search.solve import solve  # the package facade: the search layer's entry point
from ttc.decoder import (Completion, ModelNotFoundError, PoolExhausted, PromptTooLong, SamplingParams,
                         UnsupportedModelError)

__all__ = ["load", "Model", "solve", "Problem", "Branch", "Step", "Scored", "Result", "Meter", "MissingCapability", "Budget",
           "BudgetExceeded", "Ledger", "Completion", "SamplingParams",
           "ModelNotFoundError", "PoolExhausted", "PromptTooLong", "UnsupportedModelError"]
__version__ = "0.1.0"
