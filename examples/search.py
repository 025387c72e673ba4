#!/usr/bin/env python
"""Search a folder of images with a prompt_peft adapter (or a bare backbone).

    # 1. embed every image under a folder (photos/<class>/<image> gives each hit a class) and save an index
    python examples/search.py index --adapter outputs/quickstart/adapter --image_size 70 \\
        --images photos/ --index_dir outputs/index [--kind flat|ivf|hnsw]
    # 2. answer queries with the model recorded in the index: top-k ids, scores, classes (+ a PNG)
    python examples/search.py query --index_dir outputs/index --k 5 query1.jpg query2.jpg --gallery hits.png

Without --adapter, --backbone alone indexes with the frozen backbone's pooled token. The logic is in
prompt_peft.serving; this script only parses arguments and prints.
"""

from __future__ import annotations

import argparse
import json
import sys

from prompt_peft.retrieval.index import INDEX_KINDS
from prompt_peft.serving import Embedder, SearchIndex, search_gallery


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("index", help="embed a folder of images and save an index")
    build.add_argument("--adapter", help="adapter folder or Hub id (omit to use the bare backbone)")
    build.add_argument("--backbone", help="backbone Hub id or path (default: the adapter's base model)")
    build.add_argument("--revision", help="revision of the adapter repo")
    build.add_argument("--image_size", type=int, help="resolution the adapter was trained at (default: native)")
    build.add_argument("--images", required=True, help="folder of images (or of class sub-folders of images)")
    build.add_argument("--index_dir", required=True, help="where to save the index")
    build.add_argument("--kind", choices=INDEX_KINDS, default="flat", help="flat: exact; ivf / hnsw: approximate")
    build.add_argument("--batch_size", type=int, default=32)
    query = commands.add_parser("query", help="search a saved index with query images")
    query.add_argument("--index_dir", required=True)
    query.add_argument("--k", type=int, default=5, help="results per query")
    query.add_argument("--gallery", help="also write the results as a PNG to this path")
    query.add_argument("--json", action="store_true", help="print JSON instead of a table")
    query.add_argument("queries", nargs="+", help="query image files")
    args = parser.parse_args(argv)
    if args.command == "index" and not (args.adapter or args.backbone):
        parser.error("index: give --adapter, --backbone, or both")
    return args


def main(argv=None) -> list:
    args = parse_args(argv)
    if args.command == "index":
        embedder = Embedder.load(args.adapter, args.backbone, image_size=args.image_size, revision=args.revision)
        index = SearchIndex.build(embedder, args.images, kind=args.kind, batch_size=args.batch_size)
        folder = index.save(args.index_dir)
        classes = f" in {len(index.class_names)} classes" if index.class_names else ""
        print(f"indexed {len(index.index)} images{classes} ({index.index.kind}) -> {folder}")
        return []
    index = SearchIndex.load(args.index_dir)
    results = index.search(Embedder.from_index(args.index_dir), args.queries, k=args.k)
    if args.json:
        print(json.dumps([{"query": q, "hits": [vars(h) for h in hits]} for q, hits in zip(args.queries, results)]))
    else:
        for query, hits in zip(args.queries, results):
            print(query)
            for rank, hit in enumerate(hits, start=1):
                print(f"  {rank:>2}. {hit.score:.4f}  {hit.id}" + (f"  [{hit.label}]" if hit.label else ""))
    if args.gallery:
        search_gallery(args.queries, results, index.image_root).save(args.gallery)
        print(f"gallery written to {args.gallery}", file=sys.stderr)
    return results


if __name__ == "__main__":
    main()
