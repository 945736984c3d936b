"""Persistence: SQLAlchemy models, engine/session set-up and spool files.

Knows nothing of the network or the model.  The database is the hand-off between stages: each
stage reads rows in the state it consumes and writes the next state in one transaction.
"""

# Registers the mapper event that keeps study_scores in step with every prediction recorded, whoever
# records it: importing anything from this package (models included) brings it in.
from . import study_scores as _study_scores  # noqa: E402,F401
