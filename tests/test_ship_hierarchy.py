"""SHIP's offline statistics: the level chain on hand-made affinities, the affinity, k-means, fit_hierarchy."""

import pytest
import torch
from peft import get_peft_model
from tiny_models import pixels, tiny_model

from prompt_peft.tuners.ship import SHIPConfig
from prompt_peft.tuners.ship.hierarchy import (
    collect_statistics,
    fit_hierarchy,
    kmeans,
    layer_affinity,
    semantic_levels,
)



pytestmark = pytest.mark.usefixtures("one_thread")


def affinity_from_positions(positions, rate=0.04):
    """A[i, j] = 1 - rate * |p_i - p_j|: blocks whose positions are close are similar."""
    p = torch.tensor(positions, dtype=torch.float64)
    return 1 - rate * (p[:, None] - p[None, :]).abs()


def dfs_levels(affinity, tau):
    """The official code's recursive search, rewritten here as an independent oracle."""
    n = len(affinity)
    visited, group = [False] * n, []

    def visit(node):
        visited[node] = True
        group.append(node)
        for neighbour in range(node + 1, n):
            if not visited[neighbour]:
                visited[neighbour] = True
                if affinity[node][neighbour] < tau:
                    visit(neighbour)

    visit(0)
    return group


def test_cifar100_example_of_the_spec():
    # Late blocks drift more slowly, so the last level is 8..10 and block 11 starts a new one.
    affinity = affinity_from_positions([0, 1, 2, 3, 4, 5, 6, 7, 8, 8.6, 9.2, 10])
    assert semantic_levels(affinity, 0.93) == [0, 2, 4, 6, 8, 11]
    assert dfs_levels(affinity.tolist(), 0.93) == [0, 2, 4, 6, 8, 11]


def test_high_threshold_gives_one_level_per_block_and_low_one_level():
    affinity = affinity_from_positions(range(12), rate=0.01)  # all off-diagonal affinities in [0.89, 0.99]
    assert semantic_levels(affinity, 0.995) == list(range(12))  # e.g. dtd with tau 0.98: all 12 blocks
    assert semantic_levels(affinity, 1.0) == list(range(12))
    assert semantic_levels(affinity, 0.5) == [0]


def test_level_is_compared_with_its_first_block_not_the_previous_one():
    # Each neighbour pair is similar (0.97), but block 3 is too far from block 0, the head of the level.
    affinity = affinity_from_positions([0, 1, 2, 3, 4], rate=0.03)
    assert semantic_levels(affinity, 0.92) == [0, 3]


def test_end_layer_stops_new_levels():
    affinity = affinity_from_positions([0, 1, 2, 3, 4, 5, 6, 7, 8, 8.6, 9.2, 10])
    assert semantic_levels(affinity, 0.93, end_layer=8) == [0, 2, 4, 6]
    assert semantic_levels(affinity, 0.93, end_layer=9) == [0, 2, 4, 6, 8]


@pytest.mark.parametrize("seed", range(5))
def test_greedy_chain_equals_the_codes_search_on_random_matrices(seed):
    gen = torch.Generator().manual_seed(seed)
    a = torch.rand(12, 12, generator=gen) * 0.2 + 0.8
    a = (a + a.T) / 2
    for tau in (0.85, 0.9, 0.95):
        assert semantic_levels(a, tau) == dfs_levels(a.tolist(), tau)


def test_semantic_levels_rejects_a_non_square_matrix():
    with pytest.raises(ValueError, match="square"):
        semantic_levels(torch.ones(3, 4), 0.9)


def test_layer_affinity_by_hand():
    # 3 blocks, 2 images, 2-D features; cosines are easy to write down.
    features = torch.tensor([
        [[1.0, 0.0], [0.0, 2.0]],
        [[1.0, 1.0], [0.0, 1.0]],
        [[0.0, 3.0], [1.0, 0.0]],
    ])
    c = 2**-0.5
    image0 = torch.tensor([[1, c, 0], [c, 1, c], [0, c, 1]], dtype=torch.float64)
    image1 = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 1]], dtype=torch.float64)
    torch.testing.assert_close(layer_affinity(features), (image0 + image1) / 2)


def test_kmeans_finds_separated_blobs_exactly():
    centres = torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]])
    offsets = torch.tensor([[0.5, 0.0], [-0.5, 0.0], [0.0, 0.5], [0.0, -0.5]])
    x = (centres[:, None] + offsets[None]).reshape(-1, 2)
    centroids, labels = kmeans(x, 3, seed=0)
    order = centroids[:, 0] * 100 + centroids[:, 1]  # sort the clusters to compare
    torch.testing.assert_close(centroids[order.argsort()].float(), centres[[0, 2, 1]])
    assert all(len(set(labels[4 * i : 4 * i + 4].tolist())) == 1 for i in range(3))
    assert len(set(labels.tolist())) == 3


def test_kmeans_is_seeded_and_checks_k():
    x = torch.randn(60, 4, generator=torch.Generator().manual_seed(0))
    a, b = kmeans(x, 5, seed=3), kmeans(x, 5, seed=3)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    with pytest.raises(ValueError, match="at least k=61"):
        kmeans(x, 61)


def test_kmeans_matches_scikit_learn_inertia():
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    gen = torch.Generator().manual_seed(1)
    x = torch.cat([torch.randn(40, 8, generator=gen) + 4 * torch.randn(1, 8, generator=gen) for _ in range(6)])
    centroids, labels = kmeans(x, 6, seed=42)
    inertia = (x.double() - centroids[labels]).pow(2).sum().item()
    reference = sklearn_cluster.KMeans(n_clusters=6, random_state=42, n_init=1).fit(x.numpy().astype("float64"))
    assert inertia <= reference.inertia_ * 1.02
    # prototypes are the cluster means of their members, as in the official code
    for c in range(6):
        torch.testing.assert_close(centroids[c], x[labels == c].double().mean(dim=0))


@pytest.mark.parametrize("name,feature", [("ViTModel", "cls"), ("DeiTModel", "mean"), ("SiglipVisionModel", "mean")])
def test_collected_statistics_match_the_hidden_states(name, feature):
    model = tiny_model(name)
    loader = [pixels(batch=3, seed=s) for s in range(3)]
    affinity, sample, seen = collect_statistics(model, loader, feature=feature, prototype_images=100)
    prefix = {"ViTModel": 1, "DeiTModel": 2, "SiglipVisionModel": 0}[name]
    with torch.no_grad():
        states = [model(pixel_values=x, output_hidden_states=True).hidden_states[1:] for x in loader]
    per_block = [torch.cat([s[i] for s in states]) for i in range(len(states[0]))]
    features = torch.stack([h[:, 0] if feature == "cls" else h[:, prefix:].mean(1) for h in per_block])
    assert seen == 9 and sample.shape == (9, 32)
    torch.testing.assert_close(affinity, layer_affinity(features).float())
    torch.testing.assert_close(sample.sort(dim=0).values, features[-1].sort(dim=0).values)


def test_prototype_sample_is_capped_and_max_images_respected():
    loader = [pixels(batch=4, seed=s) for s in range(5)]
    _, sample, seen = collect_statistics(tiny_model("ViTModel"), loader, prototype_images=6, max_images=10)
    assert seen == 10 and sample.shape == (6, 32)


def test_cls_feature_needs_a_cls_token():
    with pytest.raises(ValueError, match="hierarchy_feature='mean'"):
        collect_statistics(tiny_model("SiglipVisionModel"), [pixels()], feature="cls")


def test_fit_hierarchy_on_a_peft_model_uses_the_frozen_backbone():
    loader = [{"pixel_values": pixels(batch=4, seed=s), "labels": torch.zeros(4)} for s in range(2)]
    bare = fit_hierarchy(tiny_model("ViTModel"), loader, share_threshold=0.9, num_prototypes=3)
    config = SHIPConfig(levels=[0, 1, 2], level_prompt_tokens=2, shared_prompt_tokens=2, attribute_prompt_tokens=2,
                        num_prototypes=3, embedding_dim=8)
    wrapped = get_peft_model(tiny_model("ViTModel"), config)
    through_peft = fit_hierarchy(wrapped, loader, share_threshold=0.9, num_prototypes=3)
    assert bare.levels == through_peft.levels and bare.num_images == 8
    assert torch.equal(bare.affinity, through_peft.affinity)
    assert torch.equal(bare.prototypes, through_peft.prototypes) and bare.prototypes.shape == (3, 32)
    assert fit_hierarchy(tiny_model("ViTModel"), loader, num_prototypes=None).prototypes is None
