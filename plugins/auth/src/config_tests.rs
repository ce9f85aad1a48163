use crate::config::parse;

fn field_of(json: &str) -> String {
    parse(json.as_bytes()).unwrap_err().field
}

const HS_KEY: &str = r#"{"kty":"oct","kid":"h","k":"MDEyMzQ1Njc4OTAxMjM0NTY3ODkwMTIzNDU2Nzg5MDE"}"#;

#[test]
fn a_complete_configuration() {
    let c = parse(
        format!(
            r#"{{"jwt":{{"issuer":"i","audiences":["a"],"jwks":{{"keys":[{HS_KEY}]}},"algorithms":["HS256"]}},
            "api_keys":{{"header":"X-Api-Key","keys":[{{"id":"ci","sha256":"{}"}}]}},
            "forward_claims":{{"sub":"x-meshgate-sub"}},"remove_credentials":true,
            "opa":{{"cluster":"opa","path":"meshgate/authz/allow","timeout_ms":250,"failure_mode":"open"}}}}"#,
            "ab".repeat(32)
        )
        .as_bytes(),
    )
    .unwrap();
    let opa = c.opa.unwrap();
    assert_eq!(opa.upstream.path, "/v1/data/meshgate/authz/allow");
    assert_eq!(opa.upstream.authority, "opa");
    assert!(opa.fail_open);
    assert_eq!(c.api_keys.unwrap().header, "x-api-key");
    assert_eq!(c.forward_claims, vec![("sub".to_string(), "x-meshgate-sub".to_string())]);
    let jwt = c.jwt.unwrap();
    assert_eq!(jwt.inline_keys.len(), 1);
    assert_eq!(jwt.policy.clock_skew_seconds, 30);
}

#[test]
fn errors_name_the_field() {
    assert_eq!(field_of("[]"), "(root)");
    assert_eq!(field_of("{}"), "jwt");
    assert_eq!(field_of(r#"{"jwt":{}}"#), "jwt.jwks");
    assert_eq!(field_of(r#"{"jwt":{"jwks":{"keys":[{"kty":"oct","k":"c2hvcnQ"}]}}}"#), "jwt.jwks");
    assert_eq!(field_of(&format!(r#"{{"jwt":{{"jwks":{{"keys":[{HS_KEY}]}},"algorithms":["none"]}}}}"#)), "jwt.algorithms[0]");
    assert_eq!(field_of(r#"{"jwt":{"jwks_uri":{"path":"/jwks"}}}"#), "jwt.jwks_uri.cluster");
    assert_eq!(field_of(r#"{"api_keys":{"keys":[{"id":"a","sha256":"xyz"}]}}"#), "api_keys.keys[0].sha256");
    assert_eq!(field_of(r#"{"api_keys":{"keys":[]}}"#), "api_keys.keys");
    let ok_keys = format!(r#""api_keys":{{"keys":[{{"id":"a","sha256":"{}"}}]}}"#, "00".repeat(32));
    assert_eq!(field_of(&format!(r#"{{{ok_keys},"opa":{{"path":"x"}}}}"#)), "opa.cluster");
    assert_eq!(field_of(&format!(r#"{{{ok_keys},"opa":{{"cluster":"o","path":"../x"}}}}"#)), "opa.path");
    assert_eq!(field_of(&format!(r#"{{{ok_keys},"opa":{{"cluster":"o","path":"a/b","failure_mode":"maybe"}}}}"#)), "opa.failure_mode");
    assert_eq!(field_of(&format!(r#"{{{ok_keys},"forward_claims":{{"sub":"bad header"}}}}"#)), "forward_claims.sub");
    assert_eq!(field_of(&format!(r#"{{{ok_keys},"remove_authorization":true}}"#)), "remove_authorization");
}
