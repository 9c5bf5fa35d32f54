// The aedes MQTT 3.1.1 broker for the integration tests: `node server.mjs PORT` listens on
// 127.0.0.1:PORT with aedes' in-memory persistence (sessions live as long as this process).
// Started and stopped by its pid from tests/support/brokers.py; prints "listening" when ready.
import { createServer } from 'node:net'
import { Aedes } from 'aedes'

const port = Number(process.argv[2])
const broker = await Aedes.createBroker()
const server = createServer(broker.handle)
server.listen(port, '127.0.0.1', () => console.log(`aedes ${port} listening`))
process.on('SIGTERM', () => broker.close(() => process.exit(0)))
