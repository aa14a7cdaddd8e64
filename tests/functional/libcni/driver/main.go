// Command driver runs one CNI operation on a network configuration list
// through libcni, the library container runtimes use, so that the tests see
// vpcni exactly as containerd, CRI-O or podman would call it.
//
// It prints the ADD result as JSON on stdout. On failure it prints one JSON
// object on stderr, {"error": ..., "code": ..., "msg": ..., "details": ...}
// (code/msg/details only when a plugin returned a CNI error), and exits 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/invoke"
	"github.com/containernetworking/cni/pkg/types"
)

func main() {
	command := flag.String("command", "", "ADD, CHECK or DEL")
	conflist := flag.String("conflist", "", "network configuration list file (.conflist)")
	containerID := flag.String("containerid", "", "container ID")
	netns := flag.String("netns", "", "path of the container's network namespace")
	ifname := flag.String("ifname", "eth0", "interface name inside the container")
	pluginPath := flag.String("path", "", "plugin directories, separated by ':'")
	cacheDir := flag.String("cachedir", "", "libcni cache directory (never the default /var/lib/cni)")
	cniArgs := flag.String("args", "", "CNI_ARGS, as K=V;K=V")
	capArgs := flag.String("capability-args", "", "runtime capability arguments as a JSON object")
	flag.Parse()

	if err := run(*command, *conflist, *containerID, *netns, *ifname, *pluginPath, *cacheDir,
		*cniArgs, *capArgs); err != nil {
		report(err)
		os.Exit(1)
	}
}

func run(command, conflist, containerID, netns, ifname, pluginPath, cacheDir, cniArgs, capArgs string) error {
	if conflist == "" || containerID == "" || pluginPath == "" || cacheDir == "" {
		return fmt.Errorf("-conflist, -containerid, -path and -cachedir are required")
	}
	list, err := libcni.ConfListFromFile(conflist)
	if err != nil {
		return fmt.Errorf("loading %s: %w", conflist, err)
	}
	rt := &libcni.RuntimeConf{ContainerID: containerID, NetNS: netns, IfName: ifname}
	if cniArgs != "" {
		for _, kv := range strings.Split(cniArgs, ";") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("-args: %q is not K=V", kv)
			}
			rt.Args = append(rt.Args, [2]string{k, v})
		}
	}
	if capArgs != "" {
		if err := json.Unmarshal([]byte(capArgs), &rt.CapabilityArgs); err != nil {
			return fmt.Errorf("-capability-args: %w", err)
		}
	}
	cni := libcni.NewCNIConfigWithCacheDir(filepath.SplitList(pluginPath), cacheDir,
		&invoke.DefaultExec{RawExec: &invoke.RawExec{Stderr: os.Stderr}})
	ctx := context.Background()

	switch command {
	case "ADD":
		result, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			return err
		}
		return result.PrintTo(os.Stdout)
	case "CHECK":
		return cni.CheckNetworkList(ctx, list, rt)
	case "DEL":
		return cni.DelNetworkList(ctx, list, rt)
	}
	return fmt.Errorf("-command %q is not one of ADD, CHECK, DEL", command)
}

func report(err error) {
	out := map[string]interface{}{"error": err.Error()}
	var cniErr *types.Error
	if errors.As(err, &cniErr) {
		out["code"] = cniErr.Code
		out["msg"] = cniErr.Msg
		if cniErr.Details != "" {
			out["details"] = cniErr.Details
		}
	}
	line, _ := json.Marshal(out)
	fmt.Fprintln(os.Stderr, string(line))
}
