// MQTT.js client connecting exactly as the FlowFuse project-link nodes do
// (@flowfuse/nr-project-nodes: MQTT 5, clean: false, sessionExpiryInterval 120, keepalive 45,
// QoS 2, CONNECT and PUBLISH user properties, subscription identifiers, correlationData).
//
// Usage: node project_link.mjs '{"url": "ws://127.0.0.1:PORT/", "ca": "/path/ca.pem" | null,
//                               "password": "...", "run": "<unique topic level>"}'
// Prints one JSON object on stdout (exit 0), or {"error": "..."} (exit 1).
import fs from 'node:fs'
import crypto from 'node:crypto'
import mqtt from 'mqtt'

const cfg = JSON.parse(process.argv[2])
const run = cfg.run
const TEAM = 'team1'
const hex = (n) => crypto.randomBytes(n).toString('hex')

function options (project) {
  const username = `project:${TEAM}:${project}`
  const opts = {
    clientId: `${username}:n:${hex(2)}`, // HA-mode form of the project nodes' client id
    username,
    password: cfg.password,
    protocolVersion: 5,
    clean: false,
    keepalive: 45,
    reconnectPeriod: 0, // the nodes reconnect every 3-7 s; a test wants the first failure
    connectTimeout: 10000,
    properties: {
      sessionExpiryInterval: 120,
      requestResponseInformation: true,
      requestProblemInformation: true,
      userProperties: { project, application: `app-${project}` }
    }
  }
  if (cfg.ca) {
    opts.ca = fs.readFileSync(cfg.ca)
    opts.rejectUnauthorized = true
  }
  return opts
}

function connect (opts) {
  return new Promise((resolve, reject) => {
    const client = mqtt.connect(cfg.url, opts)
    client.once('connect', (connack) => resolve({ client, connack }))
    client.once('error', (err) => { client.end(true); reject(err) })
  })
}

function subscribe (client, topic, subscriptionIdentifier) {
  return new Promise((resolve) => {
    client.subscribe(topic, { qos: 2, properties: { subscriptionIdentifier } }, (err, granted) => {
      // a refused filter: MQTT.js reports an error carrying the SUBACK and its reason codes
      const codes = err?.packet?.granted ?? (granted || []).map((g) => g.qos)
      const refused = codes.find((code) => code >= 0x80)
      resolve({ topic, error: err ? (err.code ?? refused ?? String(err)) : null, granted: codes })
    })
  })
}

function publish (client, topic, payload, properties) {
  return new Promise((resolve) => {
    client.publish(topic, payload, { qos: 2, properties }, (err, packet) => {
      resolve({ topic, error: err ? (err.code ?? String(err)) : null, reasonCode: packet?.reasonCode ?? null })
    })
  })
}

function end (client) {
  return new Promise((resolve) => client.end(false, {}, resolve))
}

function linkProperties (project, nodeId, extra = {}) {
  return {
    contentType: 'application/json',
    userProperties: {
      _projectID: project,
      _applicationID: `app-${project}`,
      _nodeID: nodeId,
      _publishTime: String(Date.now())
    },
    ...extra
  }
}

function describe (topic, payload, packet) {
  const p = packet.properties || {}
  const ids = p.subscriptionIdentifier
  return {
    topic,
    qos: packet.qos,
    payload: payload.toString(),
    subscriptionIdentifiers: ids === undefined ? [] : (Array.isArray(ids) ? ids : [ids]),
    contentType: p.contentType ?? null,
    userProperties: p.userProperties ?? {},
    responseTopic: p.responseTopic ?? null,
    correlationData: p.correlationData ? Buffer.from(p.correlationData).toString('hex') : null
  }
}

async function main () {
  const result = { connack: {}, subscribe: [], messages: [], responses: [], publish: [] }
  const optsA = options('p1')
  const optsB = options('p2')
  const a = await connect(optsA)
  const b = await connect(optsB)
  result.connack.p1 = { sessionPresent: a.connack.sessionPresent, reasonCode: a.connack.reasonCode ?? 0 }
  result.connack.p2 = { sessionPresent: b.connack.sessionPresent, reasonCode: b.connack.reasonCode ?? 0 }

  const resTopic = `ff/v1/${TEAM}/p/p2/res-${hex(4)}/${run}`
  const callTopic = `ff/v1/${TEAM}/p/p1/in/${run}/call`
  const correlation = Buffer.from(hex(8), 'hex')

  let done
  const finished = new Promise((resolve) => { done = resolve })

  // p1: the "project link in" nodes (broadcast: id 1; messages sent to this project: id 2)
  a.client.on('message', (topic, payload, packet) => {
    const m = describe(topic, payload, packet)
    result.messages.push(m)
    if (topic === callTopic && m.responseTopic) {
      // "project link call" reply: to the response topic, with the caller's correlation data
      publish(a.client, m.responseTopic, JSON.stringify({ reply: 'pong' }),
        linkProperties('p1', 'link-in-2', { correlationData: packet.properties.correlationData }))
    }
  })
  b.client.on('message', (topic, payload, packet) => {
    result.responses.push(describe(topic, payload, packet))
    done()
  })

  result.subscribe.push(await subscribe(a.client, `ff/v1/${TEAM}/p/+/out/${run}/#`, 1))
  result.subscribe.push(await subscribe(a.client, `ff/v1/${TEAM}/p/p1/in/${run}/#`, 2))
  result.subscribe.push(await subscribe(a.client, 'ff/v1/team2/p/+/out/#', 1)) // another team: refused
  result.subscribe.push(await subscribe(b.client, resTopic, 1))

  result.publish.push(await publish(b.client, `ff/v1/${TEAM}/p/p2/out/${run}/broadcast`,
    JSON.stringify({ hello: 'team' }), linkProperties('p2', 'link-out-1')))
  result.publish.push(await publish(b.client, callTopic, JSON.stringify({ ping: 1 }),
    linkProperties('p2', 'link-call-1', { responseTopic: resTopic, correlationData: correlation })))
  result.publish.push(await publish(b.client, 'ff/v1/team2/p/p3/in/x', 'nope', linkProperties('p2', 'link-out-2')))
  result.sentCorrelationData = correlation.toString('hex')
  result.responseTopic = resTopic

  const timer = setTimeout(() => done(), 8000)
  await finished
  clearTimeout(timer)
  await new Promise((resolve) => setTimeout(resolve, 200)) // let stray deliveries show up

  // clean: false + sessionExpiryInterval: the session survives a reconnect
  await end(a.client)
  const again = await connect(optsA)
  result.reconnectSessionPresent = again.connack.sessionPresent
  await end(again.client)
  await end(b.client)
  return result
}

const watchdog = setTimeout(() => {
  console.log(JSON.stringify({ error: 'timeout' }))
  process.exit(1)
}, 20000)

main().then((result) => {
  clearTimeout(watchdog)
  console.log(JSON.stringify(result))
  process.exit(0)
}, (err) => {
  clearTimeout(watchdog)
  console.log(JSON.stringify({ error: String(err && (err.stack || err)) }))
  process.exit(1)
})
