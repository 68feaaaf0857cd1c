import t from 'tap'
import { execFile } from 'node:child_process'
import { join } from 'node:path'
import { promisify } from 'node:util'
import { publisherToken, request, startGateway, userToken } from './helpers'

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

t.test('embedded mode never loads the Redis client library', async (t) => {
  // In a process of its own: this one's module cache holds whatever other tests loaded.
  const app = join(__dirname, '..', 'src', 'app.js')
  const script = `
    const { buildApp } = require(${JSON.stringify(app)})
    const { loadConfig } = require(${JSON.stringify(join(__dirname, '..', 'src', 'config.js'))})
    buildApp(loadConfig({ JWT_SECRET: 's', LOG_LEVEL: 'silent' })).then(async (app) => {
      await app.ready()
      await app.close()
      console.log(Object.keys(require.cache).filter((file) => file.includes('/node_modules/ioredis/')).length)
    })`
  const { stdout } = await promisify(execFile)(process.execPath, ['-e', script], { timeout: 20_000 })
  t.equal(stdout.trim(), '0', 'no module of ioredis was loaded')
})

t.test('answers are not to be stored by any cache (Cache-Control: no-store): a publish, job state, an error; pages keep their own', async (t) => {
  const { url } = await startGateway(t)
  const publisher = publisherToken()
  const answers = [
    await request(`${url}/v1/publish`, { method: 'POST', token: publisher, body: { to: { user: 'u1' }, data: 1 } }),
    await request(`${url}/v1/jobs/job-cache`, { method: 'PUT', token: publisher, body: { userId: 'u1', status: 'active', progress: 1 } }),
    await request(`${url}/v1/jobs/job-cache`, { token: userToken('u1') }),
    await request(`${url}/v1/presence/u1`, { token: publisher }),
    await request(`${url}/v1/presence/u1`),
    await request(`${url}/v1/nowhere`)
  ]
  t.same(answers.map((answer) => [answer.status, answer.headers.get('cache-control')]), [
    [202, 'no-store'], [200, 'no-store'], [200, 'no-store'], [200, 'no-store'], [401, 'no-store'], [404, 'no-store']
  ])
  t.equal((await request(`${url}/demo`)).headers.get('cache-control'), 'no-cache', 'a page revalidates, as it did')
})
