"""`piescope graph build|export|import`: attribution graphs of stored circuits, and graph files.

build runs the same `graph` job the API runs, in-process, and stores the graph on the circuit;
export writes one prompt's stored graph as circuit-tracer / Neuronpedia graph JSON; import
stores such a file as an "imported" circuit that the dashboard's circuit page draws.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pydantic import ValidationError

from backend.errors import InvalidParameterError, NotFoundError, UserError
from backend.settings import Settings


def add_parsers(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("graph", help="attribution graphs: build, export (Neuronpedia JSON), import a graph file")
    graph = p.add_subparsers(dest="graph_command", required=True, metavar="ACTION")

    b = graph.add_parser("build", help="compute the attribution graph of a stored circuit and store it")
    b.add_argument("--circuit", type=int, required=True, help="stored circuit id")
    b.add_argument("--prompt", type=int, help="one prompt index (default: all the circuit's prompts)")
    b.add_argument("--target", choices=("metric", "logit"), default="metric",
                   help="metric: the task's M (e.g. logit(IO) - logit(S)); logit: the answer's logit")
    b.set_defaults(run=cmd_build)

    e = graph.add_parser("export", help="write a stored graph as circuit-tracer / Neuronpedia graph JSON")
    e.add_argument("--circuit", type=int, required=True, help="stored circuit id")
    e.add_argument("--prompt", type=int, help="prompt index (default: the graph's first prompt)")
    e.add_argument("--target", choices=("metric", "logit"), default="metric")
    e.add_argument("--key", help='stored graph key ("all", "3", "all@logit"...); default: the prompt\'s own '
                                 'graph if computed, else "all"')
    e.add_argument("--out", type=Path, help="output file (default: stdout)")
    e.set_defaults(run=cmd_export)

    i = graph.add_parser("import", help="store a circuit-tracer / Neuronpedia graph JSON file as a circuit")
    i.add_argument("file", type=Path)
    i.add_argument("--model", help="model name (default: the file's metadata.scan)")
    i.add_argument("--transcoder", help="<model>/<dir> (default: from metadata.scan)")
    i.set_defaults(run=cmd_import)


def cmd_build(args: argparse.Namespace, settings: Settings) -> None:
    from backend import jobs as job_functions
    from backend.api.jobs import PIE_KINDS
    from backend.cli.output import progress_bar
    from backend.store.db import open_store, transaction
    from backend.store.queries import graph_key
    try:
        params = job_functions.GraphParams(circuit_id=args.circuit, prompt=args.prompt, target=args.target)
    except ValidationError as err:
        first = err.errors()[0]
        raise InvalidParameterError(f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}") from None
    spec = PIE_KINDS["graph"]
    engine, sessions = open_store(settings)
    try:
        with sessions() as session:
            spec.check(settings, session, params)
        bar, update = progress_bar("graph")
        try:
            output = spec.run(job_functions.JobContext(settings), sessions, params, update)
        finally:
            bar.close()
        with transaction(sessions) as session:
            spec.store(settings, session, params, output)
    finally:
        engine.dispose()
    key = graph_key(args.prompt, args.target)
    graphs = output.result["graphs"]
    print(f"circuit {args.circuit}: stored graph '{key}' ({len(graphs)} prompt(s), target "
          f"{graphs[0]['target']['label'] if graphs and graphs[0]['target'] else args.target})")


def cmd_export(args: argparse.Namespace, settings: Settings) -> None:
    from backend.store import queries
    from backend.store.db import open_store
    from backend.store.graph_files import export_graph
    engine, sessions = open_store(settings)
    try:
        with sessions() as session:
            key = args.key
            if key is None:  # the prompt's own graph, else "all", else any graph of that target
                keys = queries.get_circuit(session, args.circuit).graph_keys or []
                same = [k for k in keys if k.endswith("@logit") == (args.target == "logit")]
                own = queries.graph_key(args.prompt, args.target) if args.prompt is not None else None
                every = queries.graph_key(None, args.target)
                key = own if own in keys else every if every in keys or not same else same[0]
            data = export_graph(session, args.circuit, key, args.prompt)
    finally:
        engine.dispose()
    text = json.dumps(data)
    if args.out is None:
        sys.stdout.write(text + "\n")
        return
    args.out.write_text(text)
    print(f"wrote {args.out} ({len(data['nodes'])} nodes, {len(data['links'])} links)", file=sys.stderr)


def cmd_import(args: argparse.Namespace, settings: Settings) -> None:
    from backend.store.db import open_store, transaction
    from backend.store.graph_files import import_graph
    if not args.file.is_file():
        raise NotFoundError(f"no graph file {args.file}")
    try:
        doc = json.loads(args.file.read_bytes())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{args.file} is not JSON: {err}") from None
    if not isinstance(doc, dict):
        raise InvalidParameterError(f"{args.file} is not a graph JSON (an object with metadata, nodes, links)")
    engine, sessions = open_store(settings)
    try:
        with transaction(sessions) as session:
            circuit_id, key = import_graph(session, doc, model=args.model, transcoder=args.transcoder)
    finally:
        engine.dispose()
    print(f"imported {args.file} as circuit {circuit_id} (graph '{key}', {len(doc['nodes'])} nodes, "
          f"{len(doc['links'])} links); dashboard: /circuit?id={circuit_id}")
