// The page's script (tests/e2e/test_browser.py): one MQTT.js connection over wss from the browser.
//
// Its settings come in the URL fragment (never sent to the page server), as JSON:
//   {url, username, password, clientId, subscribe?, publish?: {topic, payload}, expect?, timeout?}
// It connects with MQTT 5 (reconnectPeriod 0: one attempt), subscribes to `subscribe` (QoS 1), publishes
// `publish` (QoS 1), and waits until `expect` messages have arrived, the connection closes, or `timeout`
// ms pass. What happened goes into window.mqttResult and, as JSON, into <pre id="result">.
(function () {
  "use strict";
  const status = document.getElementById("status");
  const result = {
    origin: window.location.origin,
    connected: false,
    connack: null,
    granted: null,
    published: null,
    messages: [],
    errors: [],
    finish: null,
  };
  let client = null;
  let finished = false;

  function finish(reason) {
    if (finished) return;
    finished = true;
    result.finish = reason;
    if (client !== null) client.end(true);
    document.getElementById("result").textContent = JSON.stringify(result);
    window.mqttResult = result;
    status.textContent = "done: " + reason;
  }

  function errorText(err) {
    return { message: String((err && err.message) || err), code: err && err.code !== undefined ? err.code : null };
  }

  let cfg;
  try {
    cfg = JSON.parse(decodeURIComponent(window.location.hash.slice(1)));
  } catch (err) {
    result.errors.push(errorText(err));
    finish("bad settings");
    return;
  }
  const expect = cfg.expect || 0;

  function check() {
    const subscribed = !cfg.subscribe || result.granted !== null;
    const published = !cfg.publish || result.published !== null;
    if (subscribed && published && result.messages.length >= expect) finish("ok");
  }

  window.setTimeout(() => finish("timeout"), cfg.timeout || 8000);
  status.textContent = "connecting";
  client = mqtt.connect(cfg.url, {
    protocolVersion: 5,
    username: cfg.username,
    password: cfg.password,
    clientId: cfg.clientId,
    clean: true,
    keepalive: 30,
    reconnectPeriod: 0,
    connectTimeout: 5000,
  });

  client.on("connect", async (connack) => {
    result.connected = true;
    result.connack = { reasonCode: connack.reasonCode === undefined ? 0 : connack.reasonCode,
                       sessionPresent: connack.sessionPresent };
    status.textContent = "connected";
    try {
      if (cfg.subscribe) {
        const granted = await client.subscribeAsync(cfg.subscribe, { qos: 1 });
        result.granted = granted.map((g) => g.qos);
      }
      if (cfg.publish) {
        const ack = await client.publishAsync(cfg.publish.topic, cfg.publish.payload, { qos: 1 });
        result.published = { reasonCode: ack && ack.reasonCode !== undefined ? ack.reasonCode : 0 };
      }
    } catch (err) {
      result.errors.push(errorText(err));
      finish("failed");
      return;
    }
    check();
  });
  client.on("message", (topic, payload, packet) => {
    result.messages.push({ topic: topic, payload: payload.toString(), qos: packet.qos });
    check();
  });
  client.on("error", (err) => result.errors.push(errorText(err)));
  client.on("close", () => finish(result.connected ? "closed" : "closed before connect"));
})();
