package meshgate.authz_test

import data.meshgate.authz

req(method, path, auth) := {
	"attributes": {"request": {"http": {"method": method, "path": path, "host": "api.test", "headers": {}}}},
	"parsed_path": array.slice(split(path, "/"), 1, count(split(path, "/"))),
	"parsed_query": {},
	"auth": auth,
}

jwt(claims) := {"method": "jwt", "claims": claims}

test_public_get_allowed_for_any_identity if {
	authz.allow with input as req("GET", "/public/x", jwt({"sub": "alice"}))
}

test_public_post_denied if {
	not authz.allow with input as req("POST", "/public/x", jwt({"sub": "alice"}))
}

test_reader_role_reads_api if {
	authz.allow with input as req("GET", "/api/items", jwt({"sub": "a", "roles": ["reader"]}))
}

test_reader_role_cannot_write if {
	not authz.allow with input as req("POST", "/api/items", jwt({"sub": "a", "roles": ["reader"]}))
}

test_writer_scope_writes if {
	authz.allow with input as req("DELETE", "/api/items/1", jwt({"sub": "a", "scope": "openid writer"}))
}

test_admin_anything if {
	authz.allow with input as req("PATCH", "/admin/x", jwt({"sub": "root", "roles": ["admin"]}))
}

test_no_roles_no_api if {
	not authz.allow with input as req("GET", "/api/items", jwt({"sub": "a"}))
}

test_api_key_reader if {
	authz.allow with input as req("GET", "/api/items", {"method": "api_key", "key_id": "ci-bot"})
}

test_unknown_api_key_id_denied if {
	not authz.allow with input as req("GET", "/api/items", {"method": "api_key", "key_id": "other"})
}

test_decision_allowed_carries_tier if {
	d := authz.decision with input as req("GET", "/api/items", jwt({"sub": "a", "roles": ["admin"]}))
	d.allowed
	d.headers["x-meshgate-tier"] == "gold"
}

test_decision_default_is_403 if {
	d := authz.decision with input as req("GET", "/api/items", jwt({"sub": "a"}))
	not d.allowed
	d.http_status == 403
}

test_decision_teapot_is_418 if {
	d := authz.decision with input as req("GET", "/teapot", jwt({"sub": "a"}))
	d.http_status == 418
}

test_decision_allowed_teapot_is_allowed if {
	d := authz.decision with input as req("GET", "/teapot", jwt({"sub": "a", "roles": ["admin"]}))
	d.allowed
}
