"""The model-card pictures: the gallery marks neighbours by class, the curve spans the plot."""

import numpy as np
import torch
from PIL import Image

from prompt_peft.visualize import (
    CAPTION_HEIGHT,
    CORRECT,
    LEGEND_HEIGHT,
    MAP_COLOUR,
    QUERY,
    WRONG,
    retrieval_gallery,
    training_curve,
)


def test_gallery_rows_and_frame_colours():
    images = [Image.new("RGB", (30, 20), (i * 40, 0, 0)) for i in range(6)]
    labels = torch.tensor([0, 0, 1, 1, 2, 2])
    # image 0's nearest neighbours: 1 (same class), then 2 (other class)
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.9, 0.4], [0.0, 1.0], [-1.0, 0.0], [-0.9, -0.4]])
    gallery = retrieval_gallery(images, embeddings, labels, query_indices=[0, 3], k=2, thumb=10, border=2, legend=False)
    cell = 14
    assert gallery.size == (3 * cell + 2, 2 * cell)
    pixel = lambda col, row: gallery.getpixel((col * cell + (2 if col else 0) + 1, row * cell + 1))
    assert pixel(0, 0) == QUERY and pixel(1, 0) == CORRECT and pixel(2, 0) == WRONG
    # the thumbnail of neighbour 1 (red channel 40) sits inside its frame
    assert gallery.getpixel((cell + 2 + 2 + 5, 2 + 5)) == (40, 0, 0)


def tinted(array: np.ndarray, colour) -> np.ndarray:
    """Pixels of (anti-aliased) text drawn in ``colour`` on white: clearly coloured, same dominant channel."""
    pixels = array.astype(int)
    coloured = pixels.max(axis=-1) - pixels.min(axis=-1) > 40
    return coloured & (pixels.argmax(axis=-1) == int(np.argmax(colour)))


def test_gallery_legend_and_class_names():
    images = [Image.new("RGB", (30, 20), (i * 40, 0, 0)) for i in range(4)]
    labels = torch.tensor([0, 0, 1, 1])
    embeddings = torch.tensor([[1.0, 0.0], [0.99, 0.1], [0.0, 1.0], [0.1, 0.99]])
    draw = lambda names: np.asarray(
        retrieval_gallery(images, embeddings, labels, [0], k=2, thumb=96, border=2, class_names=names)
    )
    named, other = draw(["rose", "tulip"]), draw(["daffodil", "sunflower"])
    cell = 100
    assert named.shape[:2] == (LEGEND_HEIGHT + cell + CAPTION_HEIGHT, 3 * cell + 2)
    legend = named[:LEGEND_HEIGHT]
    for colour in (QUERY, CORRECT, WRONG):  # the three colour keys are drawn in the legend line
        assert np.all(legend == colour, axis=-1).any()
    # thumbnails are the same; the captions under them name the classes
    body = slice(LEGEND_HEIGHT, LEGEND_HEIGHT + cell)
    assert np.array_equal(named[body], other[body])
    captions = slice(LEGEND_HEIGHT + cell, None)
    assert not np.array_equal(named[captions], other[captions])
    assert tinted(named[captions], QUERY).any()  # the query's class name in the query colour


def test_training_curve_draws_loss_and_labelled_metrics():
    evaluations = [(3, {"recall@1": 0.5, "map@r": 0.25})]
    curve = training_curve([(1, 5.0), (2, 4.0), (3, 2.0)], evaluations, size=(200, 100), margin=20)
    array = np.asarray(curve)
    assert curve.size == (200, 100)
    # step 3 at the right edge (x 180); R@1 50 % and MAP@R 25 % of the [10, 80] plot height
    assert tuple(array[45, 180]) == CORRECT and tuple(array[62, 180]) == MAP_COLOUR
    # each point carries its value as text just above it (pixels of the point's colour away from the dot)
    assert tinted(array[26:40, 140:200], CORRECT).any()
    assert tinted(array[44:58, 140:200], MAP_COLOUR).any()
    dark = np.all(array == (30, 30, 30), axis=-1)
    assert dark[:, 20:30].any() and dark[:, 170:181].any()  # the loss line spans the plot
    # a bare value is R@1 (the former signature)
    assert tuple(np.asarray(training_curve([(1, 2.0), (3, 1.0)], [(3, 0.5)], size=(200, 100), margin=20))[45, 180]) == CORRECT
