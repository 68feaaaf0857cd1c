/**
 * Prints where a profiled server spent its CPU time:
 *   node dist/bench/profile.js bench/results/<run>-prof/*.cpuprofile [--top 30]
 */
import { ROOT } from './lib/server'
import { renderProfile } from './lib/profile'

const args = process.argv.slice(2)
const files: string[] = []
let top = 25
for (let index = 0; index < args.length; index++) {
  if (args[index] === '--top') top = Number(args[++index])
  else files.push(args[index])
}
if (files.length === 0) {
  process.stderr.write('usage: node dist/bench/profile.js <file.cpuprofile>... [--top N]\n')
  process.exit(1)
}
for (const file of files) process.stdout.write(`${renderProfile(file, ROOT, top)}\n\n`)
