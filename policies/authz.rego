# meshgate's example authorization policy, asked by the auth plugin after it has
# authenticated a request. The input follows OPA's Envoy integration
# (input.attributes.request.http.*, input.parsed_path, input.parsed_query) plus
# input.auth: {"method": "jwt", "claims": {...}} or {"method": "api_key", "key_id": "..."}.
#
# Two entry points, for the two answer forms the plugin understands:
#   data.meshgate.authz.allow     a boolean
#   data.meshgate.authz.decision  {allowed, http_status, headers, body}
package meshgate.authz

default allow := false

http := input.attributes.request.http

# Role names from a JWT's `roles` claim (a list) or `scope` claim (space-separated).
roles contains role if some role in input.auth.claims.roles

roles contains role if some role in split(input.auth.claims.scope, " ")

# Anyone authenticated may read /public.
allow if {
	http.method == "GET"
	input.parsed_path[0] == "public"
}

# Readers may read /api; writers may also change it.
allow if {
	http.method in {"GET", "HEAD"}
	input.parsed_path[0] == "api"
	roles & {"reader", "writer"} != set()
}

allow if {
	http.method in {"POST", "PUT", "PATCH", "DELETE"}
	input.parsed_path[0] == "api"
	"writer" in roles
}

# Admins may do anything.
allow if "admin" in roles

# API keys listed as readers may read /api.
allow if {
	input.auth.method == "api_key"
	input.auth.key_id in data.meshgate.api_key_readers
	http.method == "GET"
	input.parsed_path[0] == "api"
}

# The object form: a tier header for allowed requests, a tailored refusal otherwise.
tier := "gold" if "admin" in roles

else := "standard"

default decision := {
	"allowed": false,
	"http_status": 403,
	"headers": {"x-meshgate-policy": "meshgate.authz"},
	"body": "{\"error\":\"forbidden\",\"reason\":\"denied by meshgate.authz\"}",
}

decision := {"allowed": true, "headers": {"x-meshgate-tier": tier}} if allow

# Refusals under /teapot are 418s, to show a policy choosing the status.
decision := {
	"allowed": false,
	"http_status": 418,
	"headers": {"x-meshgate-policy": "meshgate.authz"},
	"body": "{\"error\":\"teapot\"}",
} if {
	not allow
	input.parsed_path[0] == "teapot"
}
