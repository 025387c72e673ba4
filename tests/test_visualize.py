"""The model-card pictures: the gallery marks neighbours by class, the curve spans the plot."""

import numpy as np
import torch
from PIL import Image

from prompt_peft.visualize import CORRECT, QUERY, WRONG, retrieval_gallery, training_curve


def test_gallery_rows_and_frame_colours():
    images = [Image.new("RGB", (30, 20), (i * 40, 0, 0)) for i in range(6)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # image 0's nearest neighbours: 1 (same class), then 2 (other class)
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.0, 1.0], [-1.0, 0.0], [-0.9, -0.4]])
    gallery = retrieval_gallery(images, embeddings, labels, query_indices=[0, 3], k=2, thumb=10, border=2)
    cell = 14
    assert gallery.size == (3 * cell + 2, 2 * cell)
    pixel = lambda col, row: gallery.getpixel((col * cell + (2 if col else 0) + 1, row * cell + 1))
    assert pixel(0, 0) == QUERY and pixel(1, 0) == CORRECT and pixel(2, 0) == WRONG
    # the thumbnail of neighbour 1 (red channel 40) sits inside its frame
    assert gallery.getpixel((cell + 2 + 2 + 5, 2 + 5)) == (40, 0, 0)


def test_training_curve_draws_loss_and_recall():
    curve = training_curve([(1, 5.0), (2, 4.0), (3, 2.0)], [(3, 0.5)], size=(200, 100), margin=20)
    array = np.asarray(curve)
    assert curve.size == (200, 100)
    green = np.all(array == CORRECT, axis=-1)
    assert green.any()  # the R@1 point
    ys, xs = np.nonzero(green)
    assert abs(xs.mean() - 180) < 2 and abs(ys.mean() - 45) < 2  # step 3 at the right edge; 50 % of [10, 80]
    dark = np.all(array == (30, 30, 30), axis=-1)
    assert dark[:, 20:30].any() and dark[:, 170:181].any()  # the loss line spans the plot
