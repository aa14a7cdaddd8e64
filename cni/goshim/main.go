// vpcni: the CNI executable that runtimes exec on the host. A small static Go
// program that only forwards: it reads the node config (mode, agentSocket,
// stateDir, standalonePython), sends {env, stdin} to the node agent over its
// unix socket and prints the agent's reply, exactly as cni/shim.py does (the
// reference implementation, kept for hosts without the binary).
//
//   - VERSION is answered here, with or without an agent.
//   - Agent unreachable on ADD/CHECK/STATUS/GC: CNI error 11 naming the socket
//     (7 naming the node config when that is what is wrong).
//   - Agent unreachable on DEL: the request is spooled under
//     <stateDir>/pending-del/ for the agent to replay when it starts; the DEL
//     itself succeeds.
//   - "mode": "standalone": exec the Python plugin (standalonePython -m vpcni.cni.main).
//
// The same binary is also installed as `vpcni-ipam` (`vpcnictl install-cni`): run
// under that name it serves vpcni-ipam, the CNI IPAM plugin, for plugins that
// delegate to it. Its calls go to the agent marked {"plugin": "vpcni-ipam"} (the
// agent runs vpcni-ipam in-process; a spooled DEL keeps the mark), and standalone
// mode execs standalonePython -m vpcni.ipam.plugin.
//
// Standard library only; built with CGO_ENABLED=0 (scripts/setup.sh, `vpcnictl
// install-cni`), so it runs on any host without Python.
package main

import (
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"time"
)

const (
	defaultNodeConfig = "/etc/vpcni/node.json"
	defaultSocket     = "/run/vpcni/agent.sock"
	defaultStateDir   = "/var/lib/vpcni"
	agentTimeout      = 120 * time.Second
)

// Set at build time (-ldflags -X main.standalonePython=...): the Python that has vpcni.
var standalonePython = ""

// The same list as vpcni.cni.versions.SUPPORTED (a test keeps them equal).
var supportedVersions = []string{"0.3.0", "0.3.1", "0.4.0", "1.0.0", "1.1.0"}

func supported(v string) bool {
	for _, s := range supportedVersions {
		if s == v {
			return true
		}
	}
	return false
}

func versionOf(stdin []byte) string {
	var conf struct {
		CNIVersion string `json:"cniVersion"`
	}
	if json.Unmarshal(stdin, &conf) == nil && supported(conf.CNIVersion) {
		return conf.CNIVersion
	}
	return "1.1.0"
}

func printJSON(v interface{}) {
	out, _ := json.Marshal(v)
	os.Stdout.Write(append(out, '\n'))
}

func cniError(code int, msg, version string) int {
	printJSON(map[string]interface{}{"cniVersion": version, "code": code, "msg": msg})
	return 1
}

type nodeConfig struct {
	Mode             string `json:"mode"`
	AgentSocket      string `json:"agentSocket"`
	StateDir         string `json:"stateDir"`
	StandalonePython string `json:"standalonePython"`
}

// readNodeConfig returns the node config, or why it is unusable. Only the
// shim's keys are read; the agent validates the rest and reports it properly.
func readNodeConfig(path string) (nodeConfig, string) {
	var cfg nodeConfig
	data, err := os.ReadFile(path)
	if err != nil {
		if os.IsNotExist(err) {
			return cfg, "file not found (set VPCNI_NODE_CONFIG or create it)"
		}
		return cfg, "cannot read it: " + errText(err)
	}
	var raw map[string]json.RawMessage
	if err := json.Unmarshal(data, &raw); err != nil || raw == nil {
		if err == nil {
			return cfg, "must be a JSON object"
		}
		return cfg, "cannot read JSON: " + err.Error()
	}
	for _, key := range []string{"mode", "agentSocket", "stateDir", "standalonePython"} {
		dst := map[string]*string{"mode": &cfg.Mode, "agentSocket": &cfg.AgentSocket,
			"stateDir": &cfg.StateDir, "standalonePython": &cfg.StandalonePython}[key]
		if v, ok := raw[key]; ok && string(v) != "null" {
			if err := json.Unmarshal(v, dst); err != nil {
				return cfg, fmt.Sprintf("invalid '%s' = %s: must be a string", key, v)
			}
		}
	}
	return cfg, ""
}

func errText(err error) string {
	if pe, ok := err.(*os.PathError); ok {
		err = pe.Err
	}
	if oe, ok := err.(*net.OpError); ok {
		err = oe.Err
		if se, ok := err.(*os.SyscallError); ok {
			err = se.Err
		}
	}
	if errno, ok := err.(syscall.Errno); ok {
		s := errno.Error()
		return strings.ToUpper(s[:1]) + s[1:]
	}
	return err.Error()
}

func cniEnv() map[string]string {
	env := map[string]string{}
	for _, kv := range os.Environ() {
		k, v, _ := strings.Cut(kv, "=")
		if strings.HasPrefix(k, "CNI_") || strings.HasPrefix(k, "VPCNI_") || k == "PATH" {
			env[k] = v
		}
	}
	return env
}

// The plugins this binary serves, by the name it runs under, and the Python module
// that serves each in standalone mode.
const (
	pluginVpcni = "vpcni"
	pluginIpam  = "vpcni-ipam"
)

var standaloneModule = map[string]string{
	pluginVpcni: "vpcni.cni.main",
	pluginIpam:  "vpcni.ipam.plugin",
}

// pluginOf is the plugin that argv0 names: vpcni-ipam under that name, else vpcni.
func pluginOf(argv0 string) string {
	if filepath.Base(argv0) == pluginIpam {
		return pluginIpam
	}
	return pluginVpcni
}

type request struct {
	Env   map[string]string `json:"env"`
	Stdin string            `json:"stdin"`
	// Empty for vpcni (what agents before vpcni-ipam's forwarding understood).
	Plugin string `json:"plugin,omitempty"`
}

type reply struct {
	Stdout string `json:"stdout"`
	RC     *int   `json:"rc"`
}

// dialAgent connects to the agent's socket. A full listen backlog (a burst of
// pods starting at once) answers EAGAIN at once instead of waiting: that agent
// is alive and busy, so try again for a while rather than report it away.
func dialAgent(sock string) (net.Conn, error) {
	deadline := time.Now().Add(agentTimeout)
	delay := time.Millisecond
	for {
		conn, err := net.DialTimeout("unix", sock, time.Until(deadline))
		if err == nil || !errors.Is(err, syscall.EAGAIN) || time.Now().Add(delay).After(deadline) {
			return conn, err
		}
		time.Sleep(delay)
		if delay < 50*time.Millisecond {
			delay *= 2
		}
	}
}

func askAgent(sock string, req request) (reply, error) {
	var rep reply
	conn, err := dialAgent(sock)
	if err != nil {
		return rep, err
	}
	defer conn.Close()
	conn.SetDeadline(time.Now().Add(agentTimeout))
	body, err := json.Marshal(req)
	if err != nil {
		return rep, err
	}
	_, werr := conn.Write(body)
	conn.(*net.UnixConn).CloseWrite()
	// The agent may answer before reading everything (a request it refuses as too
	// large): its answer counts even when our write was cut short.
	data, err := io.ReadAll(conn)
	if len(data) == 0 && werr != nil {
		return rep, werr
	}
	if err != nil && len(data) == 0 {
		return rep, err
	}
	if err := json.Unmarshal(data, &rep); err != nil {
		return rep, fmt.Errorf("bad reply from the agent: %v", err)
	}
	if rep.RC == nil {
		return rep, fmt.Errorf("bad reply from the agent: no rc")
	}
	return rep, nil
}

// spoolDel records a DEL the agent could not take, for it to replay on start.
func spoolDel(stateDir string, req request) (string, error) {
	spool := filepath.Join(stateDir, "pending-del")
	if err := os.MkdirAll(spool, 0o700); err != nil {
		return "", err
	}
	cid, ifname := req.Env["CNI_CONTAINERID"], req.Env["CNI_IFNAME"]
	if cid == "" {
		cid = "x"
	}
	if len(cid) > 64 {
		cid = cid[:64]
	}
	if ifname == "" {
		ifname = "x"
	}
	name := []rune(fmt.Sprintf("%d-%s-%s.json", time.Now().UnixNano(), cid, ifname))
	for i, c := range name {
		ok := c == '-' || c == '_' || c == '.' || (c < 128 && (c >= '0' && c <= '9' ||
			c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z'))
		if !ok {
			name[i] = '_'
		}
	}
	tmp := filepath.Join(spool, "."+string(name))
	data, _ := json.Marshal(req)
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return "", err
	}
	if _, err := f.Write(data); err == nil {
		err = f.Sync()
	}
	f.Close()
	final := filepath.Join(spool, string(name))
	if err := os.Rename(tmp, final); err != nil {
		return "", err
	}
	return final, nil
}

func run() int {
	plugin := pluginOf(os.Args[0])
	command := os.Getenv("CNI_COMMAND")
	if command == "VERSION" {
		stdin, _ := io.ReadAll(os.Stdin)
		printJSON(map[string]interface{}{"cniVersion": versionOf(stdin),
			"supportedVersions": supportedVersions})
		return 0
	}
	cfgPath := os.Getenv("VPCNI_NODE_CONFIG")
	if cfgPath == "" {
		cfgPath = defaultNodeConfig
	}
	node, problem := readNodeConfig(cfgPath)
	if strings.HasPrefix(problem, "invalid ") {
		// A key of the shim's own is malformed: no guessing which agent was meant.
		stdin, _ := io.ReadAll(os.Stdin)
		return cniError(7, fmt.Sprintf("node config %s: %s", cfgPath, problem), versionOf(stdin))
	}
	if node.Mode == "standalone" {
		python := node.StandalonePython
		if python == "" {
			python = standalonePython
		}
		if python == "" {
			return cniError(7, fmt.Sprintf("node config %s: mode standalone needs "+
				"standalonePython (the Python that has vpcni installed)", cfgPath), "1.1.0")
		}
		err := syscall.Exec(python, []string{python, "-m", standaloneModule[plugin]}, os.Environ())
		return cniError(11, fmt.Sprintf("cannot run %s for standalone mode: %s", python,
			errText(err)), "1.1.0")
	}
	stdin, err := io.ReadAll(os.Stdin)
	if err != nil {
		return cniError(11, "cannot read the network config from stdin: "+errText(err), "1.1.0")
	}
	sock := node.AgentSocket
	if sock == "" {
		sock = defaultSocket
	}
	req := request{Env: cniEnv(), Stdin: string(stdin)}
	if plugin != pluginVpcni {
		req.Plugin = plugin
	}
	rep, err := askAgent(sock, req)
	if err != nil {
		reason := errText(err)
		if command == "DEL" {
			stateDir := node.StateDir
			if stateDir == "" {
				stateDir = defaultStateDir
			}
			where, serr := spoolDel(stateDir, req)
			if serr != nil {
				return cniError(11, fmt.Sprintf("vpcni agent unreachable at %s (%s) and the DEL "+
					"could not be recorded (%s); retry", sock, reason, errText(serr)),
					versionOf(stdin))
			}
			fmt.Fprintf(os.Stderr, "%s: agent unreachable at %s (%s); DEL recorded in %s, "+
				"the agent completes it when it starts\n", plugin, sock, reason, where)
			return 0
		}
		if problem != "" {
			return cniError(7, fmt.Sprintf("node config %s: %s (and no vpcni agent at %s: %s)",
				cfgPath, problem, sock, reason), versionOf(stdin))
		}
		return cniError(11, fmt.Sprintf("vpcni agent unreachable at %s (%s): check that the "+
			"vpcni agent (`vpcnictl agent`, the vpcni-agent DaemonSet pod) runs on this node "+
			"and that agentSocket in %s points at its socket", sock, reason, cfgPath),
			versionOf(stdin))
	}
	if rep.Stdout != "" {
		out := rep.Stdout
		if !strings.HasSuffix(out, "\n") {
			out += "\n"
		}
		os.Stdout.WriteString(out)
	}
	return *rep.RC
}

func main() {
	os.Exit(run())
}
