import t from 'tap'
import { request, startGateway } from './helpers'

t.test('GET /health answers 200 {status: "ok"} without a token', async (t) => {
  const { url } = await startGateway(t)
  const response = await request(`${url}/health`)
  t.equal(response.status, 200)
  t.match(response.headers.get('content-type'), /^application\/json/)
  t.same(response.json, { status: 'ok' })
})

t.test('GET /ready answers 200 {status: "ready"} in embedded mode without a token', async (t) => {
  const { url } = await startGateway(t)
  const response = await request(`${url}/ready`)
  t.equal(response.status, 200)
  t.match(response.headers.get('content-type'), /^application\/json/)
  t.same(response.json, { status: 'ready' })
})
