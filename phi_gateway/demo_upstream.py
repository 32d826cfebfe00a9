"""A small "legacy" patients API (and a sliver of FHIR R4) that keeps its data in SQLite: the upstream of
``phi-gateway demo`` and of the end-to-end tests. It knows nothing of encryption; it
stores what it is sent and searches by whatever index columns it is given.

With ``record=True`` it also keeps every request it received (``GET /_received``), so
tests can prove what did, and did not, reach it; ``DELETE /_received`` forgets the
requests (``?data=1``: and the data).
"""

from __future__ import annotations

import argparse
import sqlite3
from collections.abc import Mapping
from typing import Any

import orjson
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

INDEXES = ("ssn_bidx", "phone_bidx", "name_dob_bidx")
FHIR_INDEXES = ("ssn_bidx", "family_birthdate_bidx")


class PatientStore:
    """One SQLite table of JSON documents with a column per index. Table and column names
    are constants of this module, never input."""

    def __init__(
        self, db: sqlite3.Connection, table: str = "patients", indexes: tuple[str, ...] = INDEXES
    ) -> None:
        self.db, self.table, self.indexes = db, table, indexes
        columns = ", ".join(f"{name} TEXT" for name in indexes)
        db.execute(f"CREATE TABLE IF NOT EXISTS {table} (id TEXT PRIMARY KEY, body TEXT NOT NULL, {columns})")
        for name in indexes:
            db.execute(f"CREATE INDEX IF NOT EXISTS {table}_{name} ON {table} ({name})")
        db.commit()

    def put(self, patient: dict[str, Any]) -> None:
        marks = ", ".join("?" * (2 + len(self.indexes)))
        self.db.execute(
            f"INSERT OR REPLACE INTO {self.table} (id, body, {', '.join(self.indexes)}) VALUES ({marks})",  # noqa: S608
            (str(patient["id"]), orjson.dumps(patient).decode(), *(patient.get(n) for n in self.indexes)),
        )
        self.db.commit()

    def clear(self) -> None:
        self.db.execute(f"DELETE FROM {self.table}")  # noqa: S608
        self.db.commit()

    def get(self, patient_id: str) -> dict[str, Any] | None:
        row = self.db.execute(f"SELECT body FROM {self.table} WHERE id = ?", (patient_id,)).fetchone()  # noqa: S608
        return orjson.loads(row[0]) if row else None

    def search(self, criteria: Mapping[str, Any], limit: int) -> list[dict[str, Any]]:
        """Records matching every index criterion; a criterion with several values (a repeated
        query parameter, a JSON list: the gateway sends one per pepper version during a
        rotation) matches any of them."""
        where: list[str] = ["1 = 1"]
        args: list[str] = []
        for name in self.indexes:
            if name in criteria:
                values = criteria[name] if isinstance(criteria[name], list) else [criteria[name]]
                where.append(f"{name} IN ({', '.join('?' * len(values))})" if values else "0 = 1")
                args += [str(v) for v in values]
        rows = self.db.execute(
            f"SELECT body FROM {self.table} WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",  # noqa: S608
            (*args, limit),
        ).fetchall()
        return [orjson.loads(row[0]) for row in rows]


def _multi(request: Request) -> dict[str, list[str]]:
    """Every value of every query parameter, repeated ones included."""
    return {name: request.query_params.getlist(name) for name in request.query_params}


def create_upstream(db_path: str = ":memory:", *, record: bool = False) -> Starlette:
    db = sqlite3.connect(db_path, check_same_thread=False)
    store = PatientStore(db)
    fhir = PatientStore(db, "fhir_patients", FHIR_INDEXES)
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
        return JSONResponse(store.search(_multi(request), int(request.query_params.get("limit", "100"))))

    async def search_patients(request: Request) -> Response:
        query = orjson.loads(await remember(request))
        return JSONResponse(store.search(query, int(query.get("limit", 100))))

    async def fhir_put(request: Request) -> Response:
        resource = orjson.loads(await remember(request))
        resource["id"] = request.path_params["id"]
        fhir.put(resource)
        return JSONResponse(resource, media_type="application/fhir+json")

    async def fhir_get(request: Request) -> Response:
        await remember(request)
        resource = fhir.get(request.path_params["id"])
        if resource is None:
            return JSONResponse({"resourceType": "OperationOutcome"}, status_code=404)
        return JSONResponse(resource, media_type="application/fhir+json")

    async def fhir_transaction(request: Request) -> Response:
        bundle = orjson.loads(await remember(request))
        for entry in bundle.get("entry", []):
            fhir.put(entry["resource"])
        return JSONResponse({"resourceType": "Bundle", "type": "transaction-response"})

    async def fhir_search(request: Request) -> Response:
        await remember(request)
        found = fhir.search(_multi(request), 100)
        bundle = {
            "resourceType": "Bundle",
            "type": "searchset",
            "total": len(found),
            "entry": [{"resource": r} for r in found],
        }
        return JSONResponse(bundle, media_type="application/fhir+json")

    async def show_received(request: Request) -> Response:
        if request.method == "DELETE":
            received.clear()
            if request.query_params.get("data") == "1":  # a clean slate for the next test
                store.clear()
                fhir.clear()
        return JSONResponse(received)

    routes = [
        Route("/patients", list_patients, methods=["GET"]),
        Route("/patients", create_patient, methods=["POST"]),
        Route("/patients/search", search_patients, methods=["POST"]),
        Route("/patients/{patient_id}", get_patient, methods=["GET"]),
        Route("/patients/{patient_id}", put_patient, methods=["PUT"]),
        Route("/fhir", fhir_transaction, methods=["POST"]),
        Route("/fhir/Patient", fhir_search, methods=["GET"]),
        Route("/fhir/Patient/{id}", fhir_get, methods=["GET"]),
        Route("/fhir/Patient/{id}", fhir_put, methods=["PUT"]),
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
