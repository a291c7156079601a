"""OpenAI's graders, computed here: ``string_check``, ``text_similarity``, ``score_model``, ``label_model``,
``python`` (sandboxed) and ``multi``, with the ``{{sample.*}}`` / ``{{item.*}}`` templates.

One module for every user: training rewards call :func:`grade_batch` once per step (:func:`reward_function`
wraps it for TRL's GRPOTrainer); the API's
``/v1/fine_tuning/alpha/graders`` and ``/v1/evals`` call :func:`check` then :func:`grade_batch`.
"""

from tunesmith.graders.model import EndpointBackend, LocalBackend, ModelReply
from tunesmith.graders.rewards import model_backends, reward_function
from tunesmith.graders.run import Context, Graded, grade, grade_batch
from tunesmith.graders.sandbox import Limits
from tunesmith.graders.spec import GraderError, check

__all__ = ["Context", "EndpointBackend", "Graded", "GraderError", "Limits", "LocalBackend", "ModelReply", "check",
           "grade", "grade_batch", "model_backends", "reward_function"]
