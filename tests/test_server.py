"""`blipsearch serve`'s HTTP API in process (FastAPI's TestClient): every endpoint and every error path."""

import io
import json
import os
from concurrent.futures import ThreadPoolExecutor

import pytest
from fastapi.testclient import TestClient  # the [dev] extra installs FastAPI
from PIL import Image

from blipsearch.retrieval.api import Index
from blipsearch.retrieval.server import app as server

from photos import make_folder, make_photo
from runner import assert_same_results, blipsearch, one_line_error, photo_library

QUERY = "a red dog on the beach"


@pytest.fixture(scope="module")
def library(tmp_path_factory, tiny_model_dir):
    def extra(root):
        turned = Image.new("RGB", (40, 20), (200, 30, 30))
        exif = Image.Exif()
        exif[0x0112] = 6  # shown turned by 90 degrees
        turned.save(root / "photos" / "b" / "turned.jpg", exif=exif)
        make_photo(root / "outside" / "secret.png", seed=99)  # beside the indexed folders, never served

    return photo_library(tmp_path_factory.mktemp("server"), tiny_model_dir, {"a": 4, "b": 3}, extra)


@pytest.fixture(scope="module")
def index(library):
    return Index.open(library / "index", device="cpu", precision="fp32")


@pytest.fixture()
def client(index, tmp_path):
    return TestClient(server.create_app(index, tmp_path / "thumbs"))


def paths(response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["path"] for r in response.json()["results"]]


def error(response, status: int, *fragments: str) -> str:
    assert response.status_code == status, response.text
    message = response.json()["error"]
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


def test_search_mirrors_query_json(client, library, tiny_model_dir):
    cli = json.loads(blipsearch("query", QUERY, "--json", "--top", "5", "--precision", "fp32",
                                index=library / "index").stdout)
    answer = client.get("/api/search", params={"q": QUERY, "top": 5}).json()
    assert (answer["query"], answer["model"]) == (QUERY, str(tiny_model_dir))
    assert_same_results([{k: v for k, v in r.items() if k not in ("size", "modified", "camera")}
                         for r in answer["results"]], cli["results"])
    assert all(r["size"] > 0 and r["modified"].startswith("20") for r in answer["results"])


def test_every_query_option(client, library):
    under = str(library / "photos" / "b")
    assert all(p.startswith(under) for p in paths(client.get("/api/search", params={"q": QUERY, "under": under})))
    # a prefix of the indexed paths: a folder that exists and one that does not answer alike (no probing)
    for folder in ("/root", "/no/such/folder", under + "/../c", "s3://bucket/x"):
        answer = client.get("/api/search", params={"q": QUERY, "under": folder})
        assert (answer.status_code, answer.json()["results"]) == (200, [])
    assert paths(client.get("/api/search", params={"q": QUERY, "under": under + "/../b/"})) == \
        paths(client.get("/api/search", params={"q": QUERY, "under": under}))
    itc = client.get("/api/search", params={"q": QUERY, "rerank": "false"}).json()["results"]
    assert all(r["itm_prob"] is None for r in itc)
    kept = client.get("/api/search", params={"q": QUERY, "min_prob": 1.0, "candidates": 3}).json()["results"]
    assert kept == []
    like, unlike = str(library / "photos" / "a" / "img000.png"), str(library / "photos" / "b" / "img001.png")
    composed = client.get("/api/search", params=[("q", QUERY), ("add", "2:sunset"), ("subtract", "people"),
                                                  ("like", like), ("unlike", unlike)])
    assert len(paths(composed)) == 8
    base = [("q", QUERY), ("top", 9), ("rerank", "false")]  # ITC alone: the composed vector decides
    assert paths(client.get("/api/search", params=[*base, ("like", f"5:{like}")]))[0] == like
    assert paths(client.get("/api/search", params=[*base, ("unlike", f"5:{unlike}")]))[-1] == unlike
    alone = client.get("/api/search", params=[("like", like), ("top", 3)])  # as the CLI's --image alone
    assert alone.status_code == 200 and paths(alone)[0] == like and alone.json()["query"] == f"(like {like})"
    assert paths(alone) == paths(client.get("/api/similar", params={"path": like, "top": 3}))


@pytest.mark.parametrize("params, status, fragment", [
    ({"q": QUERY, "top": 0}, 400, "top must lie between 1 and"),
    ({"q": QUERY, "candidates": 10_000}, 400, "candidates must lie between"),
    ({"q": QUERY, "min_prob": 2}, 400, "min_prob must lie between 0 and 1"),
    ({"q": QUERY, "min_prob": 0.5, "rerank": "false"}, 400, "min_prob needs the ITM re-rank"),
    ({"q": QUERY, "under": ""}, 400, "under must name a folder"),  # it searched everything
    ({"q": QUERY, "under": "photos"}, 400, "under photos is not an absolute path"),  # the server's own cwd
    ({"q": QUERY, "under": "~"}, 400, "under ~ is not an absolute path"),
    ({"q": "   "}, 400, "q is empty"),
    ({"q": QUERY, "add": " "}, 400, "add text is empty"),  # it read as q's error
    ({"q": QUERY, "subtract": "0:x"}, 400, "subtract weight must be a number"),
    ({"q": QUERY, "unlike": " "}, 400, "unlike path is empty"),
    ({"q": QUERY, "top": "many"}, 422, "top"),
    ({}, 400, "q is missing"),
    ({"q": QUERY, "like": "/etc/passwd"}, 404, "is not in the index"),
    ({"q": QUERY, "like": "~/x.jpg"}, 404, "~/x.jpg is not in the index"),  # the server's ~ is not expanded
    ({"q": QUERY, "like": "x" * 300}, 404, "is not in the index"),  # a name too long for a disk: it was a 500
    ({"q": QUERY, "add": "1e999:x"}, 400, "weight must be"),
    ({"q": QUERY, "add": "1e39:x"}, 400, "weight must be a number of size 0.001 to 1000"),
    ({"q": QUERY, "under": "/tmp\0"}, 400, "under must name a folder"),  # was a 500: a NUL byte in a path
    ({"q": QUERY, "like": ""}, 400, "like path is empty"),
    ({"q": QUERY, "add": ["x"] * 16}, 400, "a query has at most 16 terms"),
])
def test_bad_searches_are_4xx_with_a_json_error(client, params, status, fragment):
    error(client.get("/api/search", params=params), status, fragment)
    assert client.get("/api/status").status_code == 200  # still up


def test_parameters_that_are_not_utf8_are_refused_naming_them(client):
    """`q=%FF%FE` was searched as two replacement characters (the CLI and the library refuse it)."""
    error(client.get("/api/search?q=%FF%FE"), 400, "q is not valid UTF-8")
    error(client.get("/api/search?q=a&add=caf%E9"), 400, "add is not valid UTF-8")
    assert client.get("/api/search?q=caf%C3%A9+au+lait").status_code == 200


def test_unknown_routes_and_methods_are_json_errors(client):
    error(client.get("/api/nothing"), 404, "Not Found")
    error(client.post("/api/search", params={"q": QUERY}), 405, "Method Not Allowed")
    error(client.get("/api/search/image"), 405, "Method Not Allowed")


def test_search_by_an_uploaded_image(client, library, monkeypatch):
    target = library / "photos" / "a" / "img002.png"
    assert paths(client.post("/api/search/image", content=target.read_bytes()))[0] == str(target)
    composed = client.post("/api/search/image", params={"add": QUERY, "top": 3}, content=target.read_bytes())
    assert len(paths(composed)) == 3 and composed.json()["results"][0]["itm_prob"] is not None
    # the GET search's other parameters compose with it too (like, unlike, min_prob and hybrid were ignored)
    kept = client.post("/api/search/image", params={"add": QUERY, "min_prob": 1.0}, content=target.read_bytes())
    assert paths(kept) == []
    unlike = client.post("/api/search/image", params=[("unlike", f"5:{target}"), ("rerank", "false"), ("top", 9)],
                         content=target.read_bytes())
    assert paths(unlike)[0] != str(target)
    error(client.post("/api/search/image", params={"like": "/nonexistent"}, content=target.read_bytes()), 404,
          "not in the index")
    error(client.post("/api/search/image", content=b""), 400, "image is missing")
    error(client.post("/api/search/image", content=b"\x89PNG not really"), 400, "image cannot be read")
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1000)
    error(client.post("/api/search/image", content=target.read_bytes() * 50), 413, "the limit is 1000")
    monkeypatch.setattr(server, "MAX_UPLOAD_BYTES", 1 << 20)
    monkeypatch.setattr(server, "MAX_UPLOAD_PIXELS", 100)
    error(client.post("/api/search/image", content=target.read_bytes()), 413, "decompression bomb")


def test_similar(client, library):
    path = str(library / "photos" / "b" / "img000.png")
    answer = client.get("/api/similar", params={"path": path, "top": 3}).json()
    assert answer["results"][0]["path"] == path and answer["results"][0]["score"] == pytest.approx(1, abs=1e-3)
    error(client.get("/api/similar", params={"path": str(library / "outside" / "secret.png")}), 404, "not in the index")


def test_status(client, tiny_model_dir):
    status = client.get("/api/status").json()
    assert (status["files"], status["images"], status["model"]) == (8, 8, str(tiny_model_dir))


def test_status_of_an_index_damaged_since_it_opened_is_a_503_that_says_so(tmp_path, tiny_model_dir):
    """A feature segment cut short under a running server: every re-ranked search failed while the status said
    healthy."""
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    client = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    assert client.get("/api/status").json()["damaged"] is None
    segment, = (tmp_path / "index" / "features").glob("*.bin")
    os.truncate(segment, 1000)
    response = client.get("/api/status")
    assert response.status_code == 503 and "is damaged: feature segment" in response.json()["damaged"]
    assert response.json()["files"] == 2  # the rest of the report stays


def test_thumbnails_are_small_oriented_jpegs_cached_on_disk(client, library, tmp_path):
    response = client.get("/api/thumbnail", params={"path": str(library / "photos" / "b" / "turned.jpg")})
    assert response.status_code == 200 and response.headers["content-type"] == "image/jpeg"
    assert Image.open(io.BytesIO(response.content)).size == (20, 40) and len(response.content) < 20_000
    assert len(list((tmp_path / "thumbs").rglob("*.jpg"))) == 1
    again = client.get("/api/thumbnail", params={"path": str(library / "photos" / "b" / "turned.jpg")})
    assert again.content == response.content and again.headers["etag"].strip('"').endswith("-320")
    unchanged = client.get("/api/thumbnail", params={"path": str(library / "photos" / "b" / "turned.jpg")},
                           headers={"If-None-Match": again.headers["etag"]})
    assert (unchanged.status_code, unchanged.content) == (304, b"")
    # a thumbnail is sent whole: a bad Range header was answered in plain text, not {"error": ...}
    ranged = client.get("/api/thumbnail", params={"path": str(library / "photos" / "b" / "turned.jpg")},
                        headers={"Range": "bytes=5-1"})
    assert (ranged.status_code, ranged.content) == (200, response.content)


def test_a_defect_is_a_json_500_and_its_traceback_is_raised_to_the_server(index, tmp_path, monkeypatch):
    """An unexpected exception was a plain-text "Internal Server Error"."""
    monkeypatch.setattr(Index, "status", lambda self: 1 / 0)
    client = TestClient(server.create_app(index, tmp_path / "thumbs"), raise_server_exceptions=False)
    response = client.get("/api/status")
    assert response.status_code == 500
    assert response.json() == {"error": "internal error (ZeroDivisionError); the server's log has the details"}
    with pytest.raises(ZeroDivisionError):  # re-raised after the answer: uvicorn logs its traceback
        TestClient(server.create_app(index, tmp_path / "thumbs")).get("/api/status")


def test_a_file_changed_since_indexing_never_files_its_thumbnail_under_the_indexed_hash(tmp_path, tiny_model_dir):
    from blipsearch.indexer.scan import content_hash

    photo = make_photo(tmp_path / "photos" / "p.png", 1)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    index = Index.open(tmp_path / "index", device="cpu")
    indexed = index.indexed(str(photo))[1]
    client = TestClient(server.create_app(index, tmp_path / "thumbs"))
    assert client.get("/api/thumbnail", params={"path": str(photo)}).status_code == 200  # cached as indexed
    make_photo(photo, 2, size=(30, 60))  # edited after indexing
    response = client.get("/api/thumbnail", params={"path": str(photo)})
    assert Image.open(io.BytesIO(response.content)).size == (30, 60)  # the edited picture, not the indexed one
    cached = sorted(p.name for p in (tmp_path / "thumbs").rglob("*.jpg"))
    assert cached == sorted([f"{content_hash(photo)}-320.jpg", f"{indexed}-320.jpg"])
    photo.unlink()  # its cached thumbnails were still served
    error(client.get("/api/thumbnail", params={"path": str(photo)}), 404, "cannot be read")


def test_originals_are_the_files(client, library):
    path = library / "photos" / "a" / "img001.png"
    response = client.get("/api/original", params={"path": str(path)})
    assert response.content == path.read_bytes() and response.headers["content-type"] == "image/png"


@pytest.mark.parametrize("endpoint", ["/api/original", "/api/thumbnail"])
@pytest.mark.parametrize("path", ["/etc/passwd", "{root}/photos/a/../../outside/secret.png",
                                  "{root}/index/manifest.json", "photos/a/img001.png", "{root}/photos/a"])
def test_only_indexed_files_are_served(client, library, endpoint, path):
    error(client.get(endpoint, params={"path": path.format(root=library)}), 404, "is not in the index")


def test_a_symlink_swapped_in_to_lead_out_is_refused(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 2)
    make_photo(tmp_path / "outside.png", seed=5)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    client = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    victim = tmp_path / "photos" / "img000.png"
    assert client.get("/api/original", params={"path": str(victim)}).status_code == 200
    victim.unlink()
    victim.symlink_to(tmp_path / "outside.png")
    for endpoint in ("/api/original", "/api/thumbnail"):
        error(client.get(endpoint, params={"path": str(victim)}), 404, "leads out of the indexed folders")
    victim.unlink()
    victim.symlink_to("/dev/zero")
    error(client.get("/api/original", params={"path": str(victim)}), 404, "leads out of the indexed folders")


def test_indexed_files_changed_on_disk_are_409s_that_name_them_and_a_link_to_a_non_image_is_refused(
        tmp_path, tiny_model_dir):
    """A damaged EXIF block was a 500 with a traceback; a folder or FIFO in a file's place a 400 without its name;
    a link swapped in to a text file beside the photos was served as the image."""
    make_folder(tmp_path / "photos", 4)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.new("RGB", (40, 20), "navy").save(tmp_path / "photos" / "turned.jpg", exif=exif)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    client = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    turned = tmp_path / "photos" / "turned.jpg"
    data = bytearray(turned.read_bytes())
    at = data.find(b"MM\x00*")
    data[at + 1] = ord("A")  # the EXIF block's byte order mark: Pillow's exif_transpose raised SyntaxError
    turned.write_bytes(bytes(data))
    response = client.get("/api/thumbnail", params={"path": str(turned)})  # read as the indexer reads it
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (40, 20)
    turned.write_bytes(bytes(data[:len(data) // 2]))
    error(client.get("/api/thumbnail", params={"path": str(turned)}), 409, str(turned), "cannot be decoded now",
          "truncated", "run `blipsearch index` again")
    folder = tmp_path / "photos" / "img000.png"
    folder.unlink()
    folder.mkdir()
    fifo = tmp_path / "photos" / "img001.png"
    fifo.unlink()
    os.mkfifo(fifo)
    for path, reason in ((folder, "a folder"), (fifo, "a FIFO")):
        for endpoint in ("/api/original", "/api/thumbnail"):
            error(client.get(endpoint, params={"path": str(path)}), 409, str(path), reason)
    (tmp_path / "photos" / "notes.txt").write_text("not for the web")
    link = tmp_path / "photos" / "img002.png"
    link.unlink()
    link.symlink_to(tmp_path / "photos" / "notes.txt")  # inside an indexed folder, but no file the scan indexes
    for endpoint in ("/api/original", "/api/thumbnail"):
        error(client.get(endpoint, params={"path": str(link)}), 404, "leads out of the indexed folders")


def test_thumbnails_are_made_per_request_where_the_cache_cannot_be_written(index, library, tmp_path):
    (tmp_path / "a-file").write_text("")
    client = TestClient(server.create_app(index, tmp_path / "a-file" / "thumbs"))  # was a 500
    response = client.get("/api/thumbnail", params={"path": str(library / "photos" / "b" / "turned.jpg")})
    assert response.status_code == 200 and Image.open(io.BytesIO(response.content)).size == (20, 40)


def test_files_linked_from_a_store_outside_the_folders_are_served_while_their_bytes_are_the_indexed_ones(
        tmp_path, tiny_model_dir):
    """As git-annex lays them out (photos/x.png -> .annex/objects/.../x.png): indexed, and once refused."""
    make_folder(tmp_path / "store", 2)
    (tmp_path / "photos").mkdir()
    for name in ("img000.png", "img001.png"):
        (tmp_path / "photos" / name).symlink_to(tmp_path / "store" / name)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    client = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    linked = tmp_path / "photos" / "img000.png"
    original = client.get("/api/original", params={"path": str(linked)})
    assert original.status_code == 200 and original.content == (tmp_path / "store" / "img000.png").read_bytes()
    assert client.get("/api/thumbnail", params={"path": str(linked)}).status_code == 200
    assert paths(client.get("/api/similar", params={"path": str(linked), "top": 1})) == [str(linked)]
    make_photo(tmp_path / "store" / "img000.png", seed=9)  # the store's file now holds other bytes
    error(client.get("/api/original", params={"path": str(linked)}), 404, "leads out of the indexed folders")


def test_token_is_required_when_set(index, tmp_path):
    client = TestClient(server.create_app(index, tmp_path / "thumbs", token="s3cret"))
    for url in ("/", "/api/status", "/openapi.json"):
        error(client.get(url), 401, "access token")
    error(client.get("/api/status", headers={"Authorization": "Bearer wrong"}), 401, "access token")
    assert client.get("/api/status", headers={"Authorization": "Bearer s3cret"}).status_code == 200
    assert client.get("/api/status", headers={"Authorization": "bearer s3cret"}).status_code == 200  # any case
    page = client.get("/", params={"token": "s3cret"})  # the page's own image URLs then carry the cookie
    assert page.status_code == 200 and page.cookies.get(server.TOKEN_COOKIE) == "s3cret"
    assert client.get("/api/status").status_code == 200
    fresh = TestClient(server.create_app(index, tmp_path / "thumbs", token="s3cret"))
    assert fresh.get("/api/status", params={"token": "s3cret"}).status_code == 200
    wide = TestClient(server.create_app(index, tmp_path / "thumbs", token="pässwörd"))  # refused in the header
    header = {"Authorization": "Bearer pässwörd".encode()}  # its UTF-8 bytes, as curl sends them
    assert wide.get("/api/status", headers=header).status_code == 200
    assert wide.get("/api/status", params={"token": "pässwörd"}).status_code == 200
    error(wide.get("/api/status", headers={"Authorization": "Bearer passwort"}), 401, "access token")
    euro = TestClient(server.create_app(index, tmp_path / "thumbs", token="п€ss"))  # beyond Latin-1: a 500 before
    page = euro.get("/", params={"token": "п€ss"})
    assert page.status_code == 200 and euro.get("/api/status").status_code == 200  # the cookie carries it


def test_a_loopback_server_answers_only_to_loopback_names(index, tmp_path):
    """DNS rebinding: a page at evil.example pointed at 127.0.0.1 would send Host: evil.example."""
    client = TestClient(server.create_app(index, tmp_path / "thumbs", hosts=["127.0.0.1", "localhost", "[::1]"]))
    for host in ("127.0.0.1:8765", "localhost", "[::1]:8765"):
        assert client.get("/api/status", headers={"Host": host}).status_code == 200
    error(client.get("/api/status", headers={"Host": "evil.example:8765"}), 400, "must address this server")
    # another site's page loading our URLs: the browser marks it, or it names its origin
    local = {"Host": "127.0.0.1:8765"}
    error(client.get("/api/status", headers={**local, "Sec-Fetch-Site": "cross-site"}), 403, "other sites")
    error(client.get("/api/status", headers={**local, "Origin": "https://evil.example"}), 403, "other sites")
    for same in ({"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:8765"}, {"Sec-Fetch-Site": "none"}):
        assert client.get("/api/status", headers={**local, **same}).status_code == 200


def test_page_and_openapi(client):
    page = client.get("/")
    assert page.status_code == 200 and 'id="q"' in page.text and "http" not in page.text.split("<body>")[1]
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/similar", "/api/status", "/api/thumbnail",
            "/api/original"} <= set(schema["paths"])
    # what the server sends: the upload's body, {"error": ...} answers (not FastAPI's {"detail": [...]}), files
    upload = schema["paths"]["/api/search/image"]["post"]
    assert upload["requestBody"]["content"]["image/*"]["schema"]["format"] == "binary"
    for route in ("/api/search", "/api/similar", "/api/thumbnail"):
        answers = schema["paths"][route]["get"]["responses"]
        assert {"400", "404", "422", "503"} <= set(answers)
        assert answers["422"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert set(schema["paths"]["/api/original"]["get"]["responses"]["200"]["content"]) == {"image/*"}
    assert "content" not in schema["paths"]["/api/status"]["get"]["responses"]["503"]  # the status object, not an error
    search = {p["name"]: p["schema"] for p in schema["paths"]["/api/search"]["get"]["parameters"]}
    assert (search["top"]["minimum"], search["top"]["maximum"], search["sort"]["enum"]) == (1, 500, ["score", "date"])
    assert schema["components"]["schemas"]["ErrorBody"]["required"] == ["error"]
    for url in ("/docs", "/redoc"):  # FastAPI's pages load their scripts from a CDN: none is served
        error(client.get(url), 404, "Not Found")


def test_concurrent_requests_answer_alike(client):
    def one(i):
        return client.get("/api/search", params={"q": QUERY if i % 2 else "a blue car", "top": 4}).json()

    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(one, range(16)))
    assert all(a == answers[i % 2] for i, a in enumerate(answers))


def test_a_finished_index_run_is_picked_up_without_a_restart(tmp_path, tiny_model_dir):
    make_folder(tmp_path / "photos", 2)
    blipsearch("index", str(tmp_path / "photos"), "--model", str(tiny_model_dir), "-q", index=tmp_path / "index")
    client = TestClient(server.create_app(Index.open(tmp_path / "index", device="cpu"), tmp_path / "thumbs"))
    assert len(paths(client.get("/api/search", params={"q": QUERY}))) == 2
    make_folder(tmp_path / "more", 2, seed=4)
    blipsearch("index", str(tmp_path / "more"), "-q", index=tmp_path / "index")
    assert len(paths(client.get("/api/search", params={"q": QUERY}))) == 4
    assert client.get("/api/status").json()["files"] == 4


def test_serve_refuses_other_hosts_without_a_token(tmp_path, monkeypatch):
    monkeypatch.delenv("BLIPSEARCH_TOKEN", raising=False)
    result = blipsearch("serve", "--host", "0.0.0.0", index=tmp_path / "index", expect=1)
    one_line_error(result, "--host 0.0.0.0 is reachable from other machines", "--token or BLIPSEARCH_TOKEN")
    assert not os.path.exists(tmp_path / "index")


def test_serve_on_a_port_in_use_is_one_line_before_the_model_loads(tmp_path):
    """uvicorn alone once said so after the "serving" line, and exited with 3 (files skipped)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = blipsearch("serve", "--port", str(port), index=tmp_path / "index", expect=1)
    one_line_error(result, f"--port {port} on 127.0.0.1: Address already in use; stop the other server or pass "
                           "another --port")
    assert not os.path.exists(tmp_path / "index")
