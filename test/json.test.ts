/**
 * parseJsonFinite: numbers JSON.parse would read as ±Infinity (and
 * JSON.stringify write as null) are refused; everything else parses as
 * JSON.parse does, however deep; a byte order mark first is skipped.
 */
import t from 'tap'
import { NonFiniteNumberError, parseJsonFinite } from '../src/core/json'

t.test('numbers beyond a double\'s range are refused wherever they sit', async (t) => {
  for (const text of ['1e400', '-1e999', `[1${'0'.repeat(210)}e99]`, `{"a":-1${'0'.repeat(300)}e9}`, '{"a":[1,{"b":2E+309}]}', `[${'9'.repeat(400)}]`, `${'['.repeat(100_000)}1e400${']'.repeat(100_000)}`]) {
    t.throws(() => parseJsonFinite(text), { name: 'Error', message: /beyond the range/ }, text.slice(0, 30))
    t.ok((() => { try { parseJsonFinite(text) } catch (error) { return error instanceof NonFiniteNumberError } return false })(), 'as a NonFiniteNumberError')
  }
})

t.test('finite numbers, however written, and text that only looks like an exponent pass as JSON.parse reads them', async (t) => {
  for (const text of ['1e308', '-1.7976931348623157e308', '1e-400', '{"note":"1e400"}', '[0.5, 12345678901234567890]']) {
    t.same(parseJsonFinite(text), JSON.parse(text), text.slice(0, 30))
  }
  // Deeper than a recursive walk could go.
  const deep = `${'['.repeat(100_000)}1e300${']'.repeat(100_000)}`
  t.doesNotThrow(() => parseJsonFinite(deep), 'a finite number 100 000 levels deep')
  t.throws(() => parseJsonFinite('{'), { name: 'SyntaxError' }, 'not JSON is still a SyntaxError')
})

t.test('one byte order mark first is skipped; one anywhere else, or a second, is not JSON', async (t) => {
  t.same(parseJsonFinite('\ufeff{"a":[1]}'), { a: [1] })
  t.equal(parseJsonFinite('\ufeff"text"'), 'text')
  t.throws(() => parseJsonFinite('\ufeff\ufeff{}'), SyntaxError)
  t.throws(() => parseJsonFinite(' \ufeff{}'), SyntaxError)
  t.throws(() => parseJsonFinite('\ufeff'), SyntaxError)
})
