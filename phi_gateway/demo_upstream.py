"""A small "legacy" patients API that keeps its data in SQLite: the upstream of
``phi-gateway demo`` and of the end-to-end tests. It knows nothing of encryption; it
stores what it is sent and searches by whatever index columns it is given.

With ``record=True`` it also keeps every request it received (``GET /_received``), so
tests can prove what did, and did not, reach it; ``DELETE /_received`` forgets the
requests (``?data=1``: and the data).
"""

from __future__ import annotations

import argparse
import sqlite3
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

INDEXES = ("ssn_bidx", "phone_bidx", "name_dob_bidx")


class PatientStore:
    def __init__(self, path: str) -> None:
        self.db = sqlite3.connect(path, check_same_thread=False)
        columns = ", ".join(f"{name} TEXT" for name in INDEXES)  # names are constants, not input
        self.db.execute(
            f"CREATE TABLE IF NOT EXISTS patients (id TEXT PRIMARY KEY, body TEXT NOT NULL, {columns})"
        )
        for name in INDEXES:
            self.db.execute(f"CREATE INDEX IF NOT EXISTS patients_{name} ON patients ({name})")
        self.db.commit()

    def put(self, patient: dict[str, Any]) -> None:
        self.db.execute(
            f"INSERT OR REPLACE INTO patients (id, body, {', '.join(INDEXES)}) VALUES (?, ?, ?, ?, ?)",  # noqa: S608
            (str(patient["id"]), orjson.dumps(patient).decode(), *(patient.get(n) for n in INDEXES)),
        )
        self.db.commit()

    def clear(self) -> None:
        self.db.execute("DELETE FROM patients")
        self.db.commit()

    def get(self, patient_id: str) -> dict[str, Any] | None:
        row = self.db.execute("SELECT body FROM patients WHERE id = ?", (patient_id,)).fetchone()
        return orjson.loads(row[0]) if row else None

    def search(self, criteria: dict[str, str], limit: int) -> list[dict[str, Any]]:
        where = " AND ".join(f"{name} = ?" for name in criteria) or "1 = 1"
        rows = self.db.execute(
            f"SELECT body FROM patients WHERE {where} ORDER BY id LIMIT ?",  # noqa: S608 - names from INDEXES
            (*criteria.values(), limit),
        ).fetchall()
        return [orjson.loads(row[0]) for row in rows]


def create_upstream(db_path: str = ":memory:", *, record: bool = False) -> Starlette:
    store = PatientStore(db_path)
    received: list[dict[str, Any]] = []

    async def remember(request: Request) -> bytes:
        body = await request.body()
        if record and request.url.path != "/_received":
            received.append(
                {
                    "method": request.method,
                    "path": request.url.path,
                    "query": request.url.query,
                    "headers": {k: v for k, v in request.headers.items()},
                    "body": body.decode("utf-8", "replace"),
                }
            )
        return body

    async def put_patient(request: Request) -> Response:
        patient = orjson.loads(await remember(request))
        patient["id"] = request.path_params["patient_id"]
        store.put(patient)
        return JSONResponse(patient, status_code=200)

    async def create_patient(request: Request) -> Response:
        patient = orjson.loads(await remember(request))
        if "id" not in patient:
            return JSONResponse({"error": "id required"}, status_code=422)
        store.put(patient)
        return JSONResponse(patient, status_code=201)

    async def get_patient(request: Request) -> Response:
        await remember(request)
        patient = store.get(request.path_params["patient_id"])
        if patient is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(patient)

    async def list_patients(request: Request) -> Response:
        await remember(request)
        criteria = {k: v for k, v in request.query_params.items() if k in INDEXES}
        return JSONResponse(store.search(criteria, int(request.query_params.get("limit", "100"))))

    async def search_patients(request: Request) -> Response:
        query = orjson.loads(await remember(request))
        criteria = {k: v for k, v in query.items() if k in INDEXES}
        return JSONResponse(store.search(criteria, int(query.get("limit", 100))))

    async def show_received(request: Request) -> Response:
        if request.method == "DELETE":
            received.clear()
            if request.query_params.get("data") == "1":  # a clean slate for the next test
                store.clear()
        return JSONResponse(received)

    routes = [
        Route("/patients", list_patients, methods=["GET"]),
        Route("/patients", create_patient, methods=["POST"]),
        Route("/patients/search", search_patients, methods=["POST"]),
        Route("/patients/{patient_id}", get_patient, methods=["GET"]),
        Route("/patients/{patient_id}", put_patient, methods=["PUT"]),
    ]
    if record:
        routes.append(Route("/_received", show_received, methods=["GET", "DELETE"]))
    app = Starlette(routes=routes)
    app.state.store = store
    app.state.received = received
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="The demo's legacy patients API (no encryption).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--db", default=":memory:")
    parser.add_argument("--record", action="store_true", help="keep received requests at /_received")
    args = parser.parse_args()
    import uvicorn

    uvicorn.run(
        create_upstream(args.db, record=args.record), host=args.host, port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
