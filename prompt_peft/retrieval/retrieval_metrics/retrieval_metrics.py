"""`evaluate` wrapper around :func:`prompt_peft.retrieval.evaluate_embeddings`.

Load it offline with ``evaluate.load(prompt_peft.retrieval.EVALUATE_METRIC_PATH)``. The embeddings go
through an Arrow round trip as float32, so for float32 input the numbers are identical to calling
``evaluate_embeddings`` directly (which is also the faster way).
"""

import datasets
import evaluate
import numpy as np

from prompt_peft.retrieval import evaluate_embeddings

_DESCRIPTION = """Image-retrieval metrics for deep metric learning, computed leave-one-out on the embeddings
(every query searches all other samples): Recall@K (hit rate), MAP@R and R-Precision, identical to
pytorch-metric-learning's AccuracyCalculator (precision_at_1, mean_average_precision_at_r, r_precision)."""

_KWARGS_DESCRIPTION = """
Args:
    predictions: list of embeddings (each a list of floats), one per sample.
    references: list of integer class labels, one per sample.
    ks: K values for Recall@K, default (1, 2, 4, 8).
    backend: "auto", "faiss" or "torch".
Returns:
    dict with "recall@K" for each K, "map@r" and "r_precision".
Example:
    >>> metric = evaluate.load(prompt_peft.retrieval.EVALUATE_METRIC_PATH)
    >>> metric.compute(predictions=[[1.0, 0.0], [0.9, 0.1], [0.0, 1.0], [0.1, 0.9]], references=[0, 0, 1, 1], ks=[1])
    {'recall@1': 1.0, 'map@r': 1.0, 'r_precision': 1.0}
"""

_CITATION = """@inproceedings{musgrave2020metric,
  title={A Metric Learning Reality Check},
  author={Musgrave, Kevin and Belongie, Serge and Lim, Ser-Nam},
  booktitle={ECCV},
  year={2020}
}"""


class RetrievalMetrics(evaluate.Metric):
    """Recall@K, MAP@R and R-Precision of embeddings, self-retrieval mode."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {
                    "predictions": datasets.Sequence(datasets.Value("float32")),
                    "references": datasets.Value("int64"),
                }
            ),
        )

    def _compute(self, predictions, references, ks=(1, 2, 4, 8), backend="auto"):
        embeddings = np.asarray(predictions, dtype=np.float32)
        return evaluate_embeddings(embeddings, np.asarray(references), ks=ks, backend=backend)
