// A real OpenID provider for Sallyport's e2e tests: panva/oidc-provider (OpenID Certified)
// served over HTTPS on loopback, with its users, clients and certificate from a JSON file.
//
//   node provider.mjs --config provider.json
//
// It prints one line when it serves, and nothing else on stdout:
//
//   sallyport-oidc-provider ready issuer=https://127.0.0.1:40123
//
// The config file (the e2e harness, e2e/src/oidc.rs, writes it):
//
//   {
//     "bind": "127.0.0.1",            address to listen on (default 127.0.0.1)
//     "port": 0,                      0: any free port
//     "host": "127.0.0.1",            host name in the issuer URL (default: bind)
//     "tls": { "cert_file": "...", "key_file": "..." },   PEM; the chain the server sends
//     "id_token_ttl_seconds": 3600, "access_token_ttl_seconds": 3600,
//     "acr": { "password": "...", "mfa": "..." },          the two acr values it issues
//     "clients": [{ "client_id", "client_secret", "redirect_uris": [...],
//                   "post_logout_redirect_uris": [...],
//                   "id_token_signed_response_alg": "ES256" | "RS256",
//                   "token_endpoint_auth_method": "client_secret_basic" }],
//     "users": [{ "username", "password", "sub"?,
//                 "claims": { "email", "email_verified", "name", "preferred_username",
//                             "groups": [...] } }]
//   }
//
// What a browser meets: /interaction/<uid> is a plain login form (ids: username, password,
// mfa, submit, cancel; a wrong password shows #error); ticking "mfa" signs in with
// amr ["pwd","mfa"] and the mfa acr, otherwise amr ["pwd"] and the password acr. Consent is
// implied (first-party clients). RP-initiated logout shows a confirmation page (#logout-yes,
// #logout-no). prompt=login, max_age and acr_values (a session whose acr is not among the
// requested values must sign in again) are honoured.
//
// Test controls, JSON over HTTPS on the same port (loopback test harness only):
//   GET  /admin/keys           {"signing": [kid...], "published": [kid...]}
//   POST /admin/keys/rotate    new ES256 and RS256 keys sign from now on; the old ones stay
//                              published so tokens already issued still verify
//   POST /admin/keys/retire    only the newest keys stay published
//   POST /admin/ttl            {"id_token_seconds": 5, "access_token_seconds": 5}: for
//                              tokens issued from now on

import { randomBytes, generateKeyPairSync } from 'node:crypto';
import { readFileSync } from 'node:fs';
import { createServer } from 'node:https';
import { parseArgs } from 'node:util';

import Provider, { interactionPolicy } from 'oidc-provider';

const { Check } = interactionPolicy;

const { values: args } = parseArgs({ options: { config: { type: 'string' } } });
if (!args.config) {
  process.stderr.write('usage: node provider.mjs --config <file.json>\n');
  process.exit(2);
}
const config = JSON.parse(readFileSync(args.config, 'utf8'));
process.stderr.write(`oidc-provider: starting node=${process.version} config=${args.config}\n`);
const bind = config.bind ?? '127.0.0.1';
const acr = {
  password: config.acr?.password ?? 'urn:sallyport:acr:password',
  mfa: config.acr?.mfa ?? 'urn:sallyport:acr:mfa',
};
const ttl = {
  idToken: config.id_token_ttl_seconds ?? 3600,
  accessToken: config.access_token_ttl_seconds ?? 3600,
};

function log(event, fields = {}) {
  const rest = Object.entries(fields).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(' ');
  process.stderr.write(`oidc-provider: ${event}${rest ? ` ${rest}` : ''}\n`);
}

const users = new Map();
for (const user of config.users ?? []) {
  if (!user.username || typeof user.password !== 'string') {
    throw new Error(`users: every user needs "username" and "password" (got ${JSON.stringify(user.username)})`);
  }
  users.set(user.username, { ...user, sub: user.sub ?? user.username });
}
const usersBySub = new Map([...users.values()].map((user) => [user.sub, user]));

const clients = (config.clients ?? []).map((client) => ({
  client_id: client.client_id,
  client_secret: client.client_secret,
  redirect_uris: client.redirect_uris,
  post_logout_redirect_uris: client.post_logout_redirect_uris ?? [],
  response_types: ['code'],
  grant_types: ['authorization_code', 'refresh_token'],
  token_endpoint_auth_method: client.token_endpoint_auth_method ?? 'client_secret_basic',
  id_token_signed_response_alg: client.id_token_signed_response_alg ?? 'RS256',
}));

// Signing keys, newest generation first: oidc-provider signs with the first key of the
// client's algorithm and publishes all of them.
let generation = 0;
let keys = [];
function newKeys() {
  generation += 1;
  const suffix = randomBytes(4).toString('hex');
  const ec = generateKeyPairSync('ec', { namedCurve: 'P-256' }).privateKey.export({ format: 'jwk' });
  const rsa = generateKeyPairSync('rsa', { modulusLength: 2048 }).privateKey.export({ format: 'jwk' });
  return [
    { ...ec, kid: `es256-${generation}-${suffix}`, alg: 'ES256', use: 'sig', generation },
    { ...rsa, kid: `rs256-${generation}-${suffix}`, alg: 'RS256', use: 'sig', generation },
  ];
}
keys = newKeys();

const cookieKeys = [randomBytes(32).toString('base64url')];

// Stateful provider data (interactions, sessions, codes, grants, tokens) in this process's
// memory, shared by every Provider built here, so sessions survive a key rotation.
const store = new Map();
const GRANTABLE = new Set([
  'AccessToken', 'AuthorizationCode', 'RefreshToken', 'DeviceCode',
  'BackchannelAuthenticationRequest', 'PreAuthorizedCode',
]);
class MemoryStore {
  constructor(model) {
    this.model = model;
  }

  key(id) {
    return `${this.model}:${id}`;
  }

  live(key) {
    const entry = store.get(key);
    if (entry && entry.expiresAt <= Date.now()) {
      store.delete(key);
      return undefined;
    }
    return entry;
  }

  findBy(field, value) {
    for (const [key, entry] of store) {
      if (key.startsWith(`${this.model}:`) && entry.payload[field] === value && this.live(key)) {
        return entry.payload;
      }
    }
    return undefined;
  }

  async upsert(id, payload, expiresIn) {
    const expiresAt = typeof expiresIn === 'number' ? Date.now() + expiresIn * 1000 : Infinity;
    store.set(this.key(id), { payload, expiresAt });
  }

  async find(id) {
    return this.live(this.key(id))?.payload;
  }

  async findByUid(uid) {
    return this.findBy('uid', uid);
  }

  async findByUserCode(userCode) {
    return this.findBy('userCode', userCode);
  }

  async consume(id) {
    const entry = this.live(this.key(id));
    if (entry) entry.payload.consumed = Math.floor(Date.now() / 1000);
  }

  async destroy(id) {
    store.delete(this.key(id));
  }

  // Revokes the tokens and codes of a grant (never interactions or sessions, which also
  // carry a grantId).
  async revokeByGrantId(grantId) {
    for (const [key, entry] of store) {
      const model = key.slice(0, key.indexOf(':'));
      if (GRANTABLE.has(model) && entry.payload.grantId === grantId) store.delete(key);
    }
  }
}

// A session whose acr is not among the requested acr_values signs in again (step-up).
const policy = interactionPolicy.base();
policy.get('login').checks.add(new Check(
  'acr_values_unsatisfied',
  'the session does not satisfy the requested acr_values',
  (ctx) => {
    const { oidc } = ctx;
    const requested = (oidc.params.acr_values ?? '').split(' ').filter(Boolean);
    if (requested.length === 0 || !oidc.session.accountId || oidc.result?.login) {
      return Check.NO_NEED_TO_PROMPT;
    }
    return requested.includes(oidc.session.acr) ? Check.NO_NEED_TO_PROMPT : Check.REQUEST_PROMPT;
  },
  ({ oidc }) => ({ acr_values: oidc.params.acr_values }),
));

function page(title, body) {
  return `<!DOCTYPE html>
<html lang="en">
<head><meta charset="utf-8"><title>${escape(title)}</title>
<meta name="viewport" content="width=device-width, initial-scale=1"></head>
<body>
<h1>${escape(title)}</h1>
${body}
</body>
</html>`;
}

function escape(text) {
  return String(text).replace(/[&<>"']/g, (c) => `&#${c.charCodeAt(0)};`);
}

function buildProvider(issuer) {
  const provider = new Provider(issuer, {
    adapter: MemoryStore,
    clients,
    responseTypes: ['code'],
    jwks: { keys: keys.map(({ generation: _, ...jwk }) => jwk) },
    cookies: { keys: cookieKeys },
    acrValues: [acr.password, acr.mfa],
    scopes: ['openid', 'offline_access', 'email', 'profile', 'groups'],
    claims: {
      acr: null,
      amr: null,
      auth_time: null,
      sid: null,
      iss: null,
      // The authentication's acr, amr and auth_time go into every ID token.
      openid: ['sub', 'acr', 'amr', 'auth_time'],
      email: ['email', 'email_verified'],
      profile: ['name', 'preferred_username', 'given_name', 'family_name'],
      groups: ['groups'],
    },
    // Claims of the requested scopes go into the ID token too, as most providers do.
    conformIdTokenClaims: false,
    pkce: { required: () => true },
    features: {
      devInteractions: { enabled: false },
      claimsParameter: { enabled: true },
      revocation: { enabled: true },
      rpInitiatedLogout: {
        enabled: true,
        async logoutSource(ctx, form) {
          ctx.body = page('Sign out', `${form}
<p id="logout-question">Do you want to sign out from ${escape(ctx.host)}?</p>
<button id="logout-yes" type="submit" form="op.logoutForm" name="logout" value="yes">Yes, sign me out</button>
<button id="logout-no" type="submit" form="op.logoutForm">No, stay signed in</button>`);
        },
        async postLogoutSuccessSource(ctx) {
          ctx.body = page('Signed out', '<p id="signed-out">You are signed out.</p>');
        },
      },
    },
    ttl: {
      IdToken: () => ttl.idToken,
      AccessToken: () => ttl.accessToken,
      AuthorizationCode: () => 60,
      Interaction: () => 3600,
      Session: () => 24 * 3600,
      Grant: () => 24 * 3600,
      RefreshToken: () => 24 * 3600,
    },
    interactions: {
      policy,
      url: (ctx, interaction) => `/interaction/${interaction.uid}`,
    },
    async findAccount(ctx, sub) {
      const user = usersBySub.get(sub);
      if (!user) return undefined;
      return {
        accountId: sub,
        async claims() {
          return { ...user.claims, sub };
        },
      };
    },
    // First-party clients: everything they ask for is granted without a consent page.
    async loadExistingGrant(ctx) {
      const { oidc } = ctx;
      const grantId = oidc.result?.consent?.grantId || oidc.session.grantIdFor(oidc.client.clientId);
      let grant = grantId ? await oidc.provider.Grant.find(grantId) : undefined;
      if (!grant) {
        grant = new oidc.provider.Grant({ clientId: oidc.client.clientId, accountId: oidc.session.accountId });
      }
      grant.addOIDCScope([...oidc.requestParamOIDCScopes].join(' '));
      grant.addOIDCClaims([...oidc.requestParamClaims]);
      await grant.save();
      return grant;
    },
    renderError(ctx, out) {
      ctx.type = 'html';
      ctx.body = page('Sign-in error', `<p id="error-code">${escape(out.error)}</p>
<p id="error-description">${escape(out.error_description ?? '')}</p>`);
    },
  });
  for (const event of ['server_error', 'authorization.error', 'grant.error', 'end_session.error', 'userinfo.error', 'jwks.error', 'discovery.error']) {
    provider.on(event, (ctx, error) => log(event, { error: error?.message, detail: error?.error_description }));
  }
  provider.on('end_session.success', () => log('session ended'));
  return provider;
}

async function readForm(req) {
  return new URLSearchParams(await readBody(req));
}

async function readBody(req) {
  const chunks = [];
  let size = 0;
  for await (const chunk of req) {
    size += chunk.length;
    if (size > 64 * 1024) throw new Error('request body too large');
    chunks.push(chunk);
  }
  return Buffer.concat(chunks).toString('utf8');
}

function send(res, status, type, body) {
  res.statusCode = status;
  res.setHeader('Content-Type', type);
  res.setHeader('Cache-Control', 'no-store');
  res.end(body);
}

function loginPage(details, { error, username } = {}) {
  const { uid, params, prompt } = details;
  const requestedAcr = params.acr_values ? `<p id="acr-values">Requested acr_values: ${escape(params.acr_values)}</p>` : '';
  const reason = `<p id="prompt-reasons">${escape(prompt.reasons.join(' '))}</p>`;
  const failure = error ? `<p id="error" role="alert">${escape(error)}</p>` : '';
  const hint = username ?? params.login_hint ?? '';
  return page('Sign in', `<p id="client-id">${escape(params.client_id)}</p>
${requestedAcr}${reason}${failure}
<form id="login" method="post" action="/interaction/${escape(uid)}/login" autocomplete="off">
<p><label>Username <input id="username" name="username" value="${escape(hint)}" autofocus></label></p>
<p><label>Password <input id="password" name="password" type="password"></label></p>
<p><label><input id="mfa" name="mfa" type="checkbox" value="yes"> I completed a second factor (MFA)</label></p>
<p><button id="submit" type="submit">Sign in</button></p>
</form>
<form id="abort" method="post" action="/interaction/${escape(uid)}/abort">
<p><button id="cancel" type="submit">Cancel</button></p>
</form>`);
}

// The provider now serving: rebuilt (same issuer, cookie keys and in-memory sessions) when
// the keys change, since oidc-provider reads its keys once.
let current;

function serve(issuer) {
  const provider = buildProvider(issuer);
  return { issuer, provider, handler: provider.callback() };
}

async function interaction(req, res, path) {
  const provider = current.provider;
  const [, , uid, action] = path.split('/');
  const details = await provider.interactionDetails(req, res);
  if (details.uid !== uid) {
    send(res, 400, 'text/plain', 'interaction mismatch\n');
    return;
  }
  if (req.method === 'GET' && action === undefined) {
    if (details.prompt.name !== 'login') {
      // Consent is implied by loadExistingGrant; anything else is a bug here.
      log('unexpected prompt', { prompt: details.prompt.name, reasons: details.prompt.reasons });
      await provider.interactionFinished(req, res, { error: 'access_denied', error_description: `unexpected prompt ${details.prompt.name}` }, { mergeWithLastSubmission: false });
      return;
    }
    send(res, 200, 'text/html; charset=utf-8', loginPage(details));
    return;
  }
  if (req.method === 'POST' && action === 'login') {
    const form = await readForm(req);
    const username = form.get('username') ?? '';
    const user = users.get(username);
    if (!user || user.password !== (form.get('password') ?? '')) {
      log('sign-in refused', { username });
      send(res, 200, 'text/html; charset=utf-8', loginPage(details, { error: 'Invalid username or password.', username }));
      return;
    }
    const mfa = form.get('mfa') === 'yes';
    const login = {
      accountId: user.sub,
      acr: mfa ? acr.mfa : acr.password,
      amr: mfa ? ['pwd', 'mfa'] : ['pwd'],
      remember: true,
    };
    log('signed in', { username, amr: login.amr, acr: login.acr, client: details.params.client_id });
    await provider.interactionFinished(req, res, { login }, { mergeWithLastSubmission: false });
    return;
  }
  if (req.method === 'POST' && action === 'abort') {
    await provider.interactionFinished(req, res, { error: 'access_denied', error_description: 'End-User cancelled the sign-in' }, { mergeWithLastSubmission: false });
    return;
  }
  send(res, 404, 'text/plain', 'not found\n');
}

function keyReport() {
  const newest = keys[0].generation;
  return {
    signing: keys.filter((k) => k.generation === newest).map((k) => k.kid),
    published: keys.map((k) => k.kid),
  };
}

async function admin(req, res, path) {
  if (req.method === 'GET' && path === '/admin/keys') {
    send(res, 200, 'application/json', JSON.stringify(keyReport()));
    return;
  }
  if (req.method === 'POST' && path === '/admin/keys/rotate') {
    keys = [...newKeys(), ...keys];
    current = serve(current.issuer);
    log('keys rotated', keyReport());
    send(res, 200, 'application/json', JSON.stringify(keyReport()));
    return;
  }
  if (req.method === 'POST' && path === '/admin/keys/retire') {
    const newest = keys[0].generation;
    keys = keys.filter((k) => k.generation === newest);
    current = serve(current.issuer);
    log('old keys retired', keyReport());
    send(res, 200, 'application/json', JSON.stringify(keyReport()));
    return;
  }
  if (req.method === 'POST' && path === '/admin/ttl') {
    const body = JSON.parse(await readBody(req));
    for (const [field, key] of [['id_token_seconds', 'idToken'], ['access_token_seconds', 'accessToken']]) {
      if (body[field] !== undefined) {
        if (!Number.isInteger(body[field]) || body[field] < 1) {
          send(res, 400, 'text/plain', `${field} must be a positive integer\n`);
          return;
        }
        ttl[key] = body[field];
      }
    }
    log('ttl changed', { id_token_seconds: ttl.idToken, access_token_seconds: ttl.accessToken });
    send(res, 200, 'application/json', JSON.stringify({ id_token_seconds: ttl.idToken, access_token_seconds: ttl.accessToken }));
    return;
  }
  send(res, 404, 'text/plain', 'not found\n');
}

const server = createServer({
  cert: readFileSync(config.tls.cert_file),
  key: readFileSync(config.tls.key_file),
}, (req, res) => {
  if (!current) {
    send(res, 503, 'text/plain', 'starting\n');
    return;
  }
  // Endpoints are always under the issuer URL, whatever Host a client sends (oidc-provider
  // builds the URLs in discovery and redirects from the request's host).
  req.headers.host = new URL(current.issuer).host;
  const path = new URL(req.url, current.issuer).pathname;
  let handled;
  if (path.startsWith('/interaction/')) {
    handled = interaction(req, res, path);
  } else if (path.startsWith('/admin/')) {
    handled = admin(req, res, path);
  } else {
    current.handler(req, res);
    return;
  }
  handled.catch((error) => {
    log('request failed', { path, error: error.message });
    if (!res.headersSent) send(res, 400, 'text/plain', `${error.message}\n`);
    else res.end();
  });
});

server.listen(config.port ?? 0, bind, () => {
  const { port } = server.address();
  const issuer = `https://${config.host ?? bind}:${port}`;
  current = serve(issuer);
  process.stdout.write(`sallyport-oidc-provider ready issuer=${issuer}\n`);
});

for (const signal of ['SIGTERM', 'SIGINT']) {
  process.on(signal, () => {
    server.close();
    process.exit(0);
  });
}
