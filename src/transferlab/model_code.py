"""The code of a run's MLflow model (MLflow's "models from code"): copied into the model folder as is.

MLflow's pyfunc loader runs this file, which builds :class:`transferlab.pyfunc.TransferlabModel`:
nothing is pickled. It must stay these lines: ``transferlab.predict`` accepts a model folder only when
its code file holds exactly the bytes of this file, and never runs it (it reads the files itself).
"""

from mlflow.models import set_model

from transferlab.pyfunc import TransferlabModel

set_model(TransferlabModel())
